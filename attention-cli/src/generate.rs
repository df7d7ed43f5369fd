//! `attn generate`: the Qwen3-style decoder example on its committed fixture weights (random
//! weights, so the text would be meaningless: token ids are printed), greedy generation in the
//! static context (prompt by prompt) and in the paged dynamic context (all prompts in one
//! batch, chunked prefill), with tokens per second per phase and whether every token agrees
//! with the Hugging Face reference.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use qwen3::{PhaseTimes, Qwen3, fixture_dir, fixture_generations};

use crate::parse_device;

/// Options of `attn generate`.
#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// Checkpoint folder (Hugging Face config.json + model.safetensors); the committed
    /// fixture when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompts as comma-separated token ids (repeat the flag); the fixture's prompts when absent.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    new_tokens: i64,
    /// Core attention kind of the attention layers.
    #[arg(long, default_value = "dot-product-attention")]
    core_attention: String,
    /// KV block size of the paged context.
    #[arg(long, default_value_t = 4)]
    block_size: i64,
    /// Token budget per step of the paged context.
    #[arg(long, default_value_t = 16)]
    token_budget: i64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn rate(tokens: i64, secs: f64) -> f64 {
    if secs > 0.0 { tokens as f64 / secs } else { 0.0 }
}

pub(crate) fn generate(args: &GenerateArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let dir = args.model.clone().unwrap_or_else(fixture_dir);
    let model = Qwen3::load(&dir, &args.core_attention, device)?;
    let reference = if args.model.is_none() && args.prompts.is_empty() {
        fixture_generations(&dir)?
    } else {
        Vec::new()
    };
    let prompts: Vec<Vec<i64>> = if args.prompts.is_empty() {
        if reference.is_empty() {
            bail!("give --prompt token ids for a model other than the fixture");
        }
        reference.iter().map(|r| r.prompt.clone()).collect()
    } else {
        args.prompts
            .iter()
            .map(|p| {
                p.split(',')
                    .map(|t| {
                        t.trim()
                            .parse::<i64>()
                            .map_err(|e| anyhow::anyhow!("bad token id {t:?} in --prompt: {e}"))
                    })
                    .collect()
            })
            .collect::<Result<_>>()?
    };
    let c = model.config();
    println!(
        "{}: Qwen3-style decoder, {} layers, hidden {}, heads {}/{} (head_dim {}), vocab {}, core attention {}, {device:?}",
        dir.display(),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        args.core_attention
    );
    let mut static_times = PhaseTimes::default();
    let mut static_out = Vec::new();
    for p in &prompts {
        static_out.push(model.generate_static(p, args.new_tokens, &mut static_times)?);
    }
    let mut dyn_times = PhaseTimes::default();
    let dyn_out = model.generate_dynamic(
        &prompts,
        args.new_tokens,
        args.block_size,
        args.token_budget,
        &mut dyn_times,
    )?;
    for (i, (p, (s, d))) in prompts.iter().zip(static_out.iter().zip(&dyn_out)).enumerate() {
        println!("prompt {i} ({} tokens): {p:?}", p.len());
        println!("  static : {:?}", s.tokens);
        println!("  dynamic: {:?}", d.tokens);
        if let Some(qwen3::Reference { tokens, .. }) = reference.get(i) {
            let agree = s.tokens == *tokens && d.tokens == *tokens;
            println!("  Hugging Face generate: {}", if agree { "identical" } else { "DIFFERENT" });
        }
    }
    for (name, t) in [("static", static_times), ("dynamic", dyn_times)] {
        println!(
            "{name:>8}: prefill {} tokens, {:.0} tokens/s; decode {} tokens, {:.0} tokens/s",
            t.prefill_tokens,
            rate(t.prefill_tokens, t.prefill_seconds),
            t.decode_tokens,
            rate(t.decode_tokens, t.decode_seconds)
        );
    }
    println!(
        "(dynamic: {} prompts in one batch, block size {}, token budget {})",
        prompts.len(),
        args.block_size,
        args.token_budget
    );
    Ok(())
}
