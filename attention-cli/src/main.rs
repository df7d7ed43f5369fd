//! `attn`: the attention crates' command line.
//!
//! * `attn run [CONFIG.toml]` — the main job: resolves and builds a model (the embedded default
//!   when no file is given), prints its module tree and parameter count, and runs forward and
//!   backward on random data, printing shapes, output statistics and time per call.
//! * `attn train-step [CONFIG.toml]` — training steps with the training extras switched on by
//!   flags, printing loss, max logits, clip factors, peak memory and time per step.
//! * `attn generate` — the Qwen3-style decoder example on its fixture weights: greedy
//!   generation in both KV-cache contexts, token ids and tokens per second per phase.
//! * `attn bench` — the CUDA paths against their baselines (feature `cuda`).
//! * `attn check FILE.toml` — resolves and builds a model file and prints every module and
//!   parameter (name, shape, dtype), or the error with its place in the file.
//! * `attn parity PATH...` — runs Megatron-Core fixture cases and compares every tensor.
//! * `attn kinds` — lists the registered module kinds.
//!
//! Every failure prints one line and exits non-zero.

mod bench;
mod check;
mod embed;
mod generate;
mod run;
mod train_step;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use attention_spec::Model;
use clap::{Parser, Subcommand};
use tch::Device;

/// The default model of `attn run`, compiled in.
pub(crate) const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

#[derive(Parser)]
#[command(name = "attn", version, about = "Megatron-Core attention in Rust: run, check, parity")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a model and run forward + backward on random data.
    Run(run::RunArgs),
    /// Training steps with the training extras (recompute, delayed wgrad, QK-Clip, realtime tests).
    TrainStep(train_step::TrainStepArgs),
    /// Greedy generation with the Qwen3-style decoder example (static and paged contexts).
    Generate(generate::GenerateArgs),
    /// Sentence embeddings with the all-MiniLM-L6-v2 example: the texts' cosine matrix.
    Embed(embed::EmbedArgs),
    /// CUDA benchmarks against their baselines (needs the `cuda` feature and a GPU).
    Bench(bench::BenchArgs),
    /// Resolve and build a model file; print its modules and parameters.
    Check {
        /// The model file.
        file: PathBuf,
        /// Device to build on: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run Megatron-Core fixture cases (case directories, or directories holding them).
    Parity {
        /// Case directories or directories holding case directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Run the cases with this registered core-attention kind instead of the spec's.
        #[arg(long)]
        core_attention: Option<String>,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// List the registered module kinds.
    Kinds,
}

/// Parses `cpu`, `cuda` or `cuda:N`; CUDA must be available.
pub(crate) fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count();
        if i as i64 >= n {
            bail!("device {s} is not available (this machine has {n} CUDA devices)");
        }
    }
    Ok(device)
}

/// Reads and resolves a model file (or the embedded default), errors with file and place.
pub(crate) fn load_model(file: Option<&PathBuf>) -> Result<(String, Model)> {
    let registry = attention_core::registry()?;
    match file {
        None => Ok(("<default>".into(), Model::from_toml_str(DEFAULT_CONFIG, registry)?)),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let model = Model::from_toml_str(&text, registry)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok((path.display().to_string(), model))
        }
    }
}

fn parity(paths: &[PathBuf], core_attention: Option<&str>, device: &str) -> Result<bool> {
    let device = parse_device(device)?;
    if let Some(kind) = core_attention {
        let registry = attention_core::registry()?;
        match registry.get(kind) {
            Some(f) if f.role() == attention_spec::Role::CoreAttention => {}
            Some(f) => bail!("kind \"{kind}\" is a {}, not a core attention", f.role()),
            None => bail!(
                "unknown core attention kind \"{kind}\", known: {}",
                registry.kinds().join(", ")
            ),
        }
    }
    let cases = attention_tests::parity::find_cases(paths)?;
    if cases.is_empty() {
        bail!("no case directories (holding case.toml) under the given paths");
    }
    let mut failed = 0;
    for case in &cases {
        let report = attention_tests::parity::run_case(case, core_attention, device);
        if !report.passed() {
            failed += 1;
        }
        println!("{report}");
    }
    println!("{} passed, {failed} failed", cases.len() - failed);
    Ok(failed == 0)
}

fn kinds() -> Result<()> {
    let registry = attention_core::registry()?;
    for f in registry.factories() {
        let aliases = if f.aliases.is_empty() {
            String::new()
        } else {
            format!(" (also {})", f.aliases.join(", "))
        };
        println!("{:<24} {:<24} {}{aliases}", f.kind, f.role().to_string(), f.summary);
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other failure: clap's first line without its "error: ".
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("attn: error: {} (see attn --help)", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(&args).map(|_| true),
        Command::TrainStep(args) => train_step::train_step(&args).map(|_| true),
        Command::Generate(args) => generate::generate(&args).map(|_| true),
        Command::Embed(args) => embed::embed(&args).map(|_| true),
        Command::Bench(args) => bench::bench(&args).map(|_| true),
        Command::Check { file, device } => check::check(&file, &device).map(|_| true),
        Command::Parity { paths, core_attention, device } => {
            parity(&paths, core_attention.as_deref(), &device)
        }
        Command::Kinds => kinds().map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("attn: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
