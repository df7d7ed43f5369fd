//! `attn run`: the main job.
//!
//! 1. Resolves and builds the model (the embedded default when no file is given) and prints
//!    its module tree and parameter count.
//! 2. Training: forward and backward of every layer on a random batch, with output statistics
//!    and time per call.
//! 3. Inference (self-attention models): the layer stack runs a batch of prompts through
//!    prefill and decode in the static context and in the paged dynamic context, and every
//!    output is compared with the full causal forward of the same tokens. Per-phase tokens per
//!    second, KV memory in bytes and the largest error are printed (or, with `--json`, printed
//!    as one JSON object).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use attention_core::inference::InferenceContext;
use attention_core::{
    Attention, AttentionInput, AttentionOutput, BuiltLayers, RotaryEmbedding, SelfAttention,
};
use attention_inference::{
    DynamicContextOptions, DynamicInferenceContext, KvMemory, StaticInferenceContext,
};
use attention_spec::config::PositionEmbeddingType;
use attention_spec::{AttnMaskType, Model};
use clap::Args;
use serde_json::json;
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::check::print_tree;
use crate::{load_model, parse_device};

/// Options of `attn run`.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Model file; the embedded default (a 2-layer GQA decoder attention) when absent.
    config: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Batch size (training batch, and number of prompts for inference).
    #[arg(long, default_value_t = 2)]
    batch: i64,
    /// Sequence length of the training batch.
    #[arg(long, default_value_t = 256)]
    seq_len: i64,
    /// Prompt length for inference.
    #[arg(long, default_value_t = 128)]
    prompt_len: i64,
    /// Decode steps after the prompt.
    #[arg(long, default_value_t = 32)]
    decode_steps: i64,
    /// Tokens per KV block of the paged context.
    #[arg(long, default_value_t = 16)]
    block_size: i64,
    /// Token budget per step of the paged context (smaller than batch * prompt_len chunks
    /// the prefill).
    #[arg(long, default_value_t = 512)]
    token_budget: i64,
    /// Timed training iterations (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
    /// On a CUDA device, run the inference contexts with libtorch ops only, not attention-cuda's
    /// kernels (`flash_decode`, `paged-attention-cuda`), e.g. to compare the two.
    #[arg(long)]
    no_cuda_kernels: bool,
}

/// Whether the inference contexts use attention-cuda's kernels: on a CUDA device, in a build
/// with the `cuda` feature, for head dimensions the kernels take, unless turned off.
fn cuda_kernels(args: &RunArgs, model: &Model, device: Device) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && !args.no_cuda_kernels
        && attention_cuda::KERNEL_HEAD_DIMS.contains(&model.config.kv_channels)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Milliseconds per call of `f`, after one warm-up call.
fn time_ms(device: Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    sync(device);
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(device);
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
}

/// A padding mask `[b, 1, s, sk]` (true = masked) where batch row `i` has `sk - i * sk / (2b)`
/// valid keys (and queries, for self attention).
fn padding_mask(b: i64, s: i64, sk: i64, cross: bool, device: Device) -> Tensor {
    let lens: Vec<i64> = (0..b).map(|i| (sk - i * sk / (2 * b)).max(1)).collect();
    let lens = Tensor::from_slice(&lens).to_device(device);
    let keys = Tensor::arange(sk, (Kind::Int64, device)).unsqueeze(0).ge_tensor(&lens.unsqueeze(1));
    let mut m = keys.view([b, 1, 1, sk]).expand([b, 1, s, sk], true).contiguous();
    if !cross {
        let q = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0).ge_tensor(&lens.unsqueeze(1));
        m = m.logical_or(&q.view([b, 1, s, 1]));
    }
    m
}

fn with_bias(out: AttentionOutput) -> Tensor {
    match out.bias {
        Some(b) => out.output + b,
        None => out.output,
    }
}

fn stats(t: &Tensor) -> (f64, f64, f64) {
    let t = t.to_kind(Kind::Float);
    (
        t.mean(Kind::Float).double_value(&[]),
        t.std(true).double_value(&[]),
        t.abs().max().double_value(&[]),
    )
}

/// Forward + backward of every layer; returns the JSON summary.
fn training(
    args: &RunArgs,
    model: &Model,
    built: &BuiltLayers,
    device: Device,
) -> Result<serde_json::Value> {
    let c = &model.config;
    let (s, b, h) = (args.seq_len, args.batch, c.hidden_size);
    let kind = c.params_dtype.kind();
    let rope = (c.position_embedding_type == PositionEmbeddingType::Rope)
        .then(|| RotaryEmbedding::from_config(c).forward(s, 0, device));
    if !args.json {
        println!("training: batch {b}, seq_len {s}, dtype {kind:?}, rotary {}", rope.is_some());
    }
    let mut layers = Vec::new();
    for ((number, _, attn), layer) in built.layers.iter().zip(&model.layers) {
        let x = Tensor::randn([s, b, h], (kind, device)).set_requires_grad(true);
        let kv = attn.is_cross().then(|| Tensor::randn([s, b, h], (kind, device)));
        let mask = match layer.attention.attn_mask_type {
            AttnMaskType::Padding | AttnMaskType::PaddingCausal => {
                Some(padding_mask(b, s, s, attn.is_cross(), device))
            }
            _ => None,
        };
        let grad_out = Tensor::randn([s, b, h], (kind, device));
        let mut input = AttentionInput::new(&x).training(true);
        if let Some(kv) = &kv {
            input = input.with_key_value_states(kv);
        }
        if let Some(m) = &mask {
            input = input.with_mask(m);
        }
        if let Some(r) = &rope {
            input = input.with_rotary(r);
        }
        let out = attn.forward(&input)?;
        let (mean, std, max) = stats(&out.output);
        let forward_ms =
            time_ms(device, args.iters, || Ok(tch::no_grad(|| attn.forward(&input)).map(|_| ())?))?;
        let forward_backward_ms = time_ms(device, args.iters, || {
            (with_bias(attn.forward(&input)?) * &grad_out).sum(Kind::Float).backward();
            Ok(())
        })?;
        let grad_norm = x.grad().to_kind(Kind::Float).norm().double_value(&[]);
        if !args.json {
            println!(
                "layer {number}: output {:?} bias {:?}, mean {mean:+.4e} std {std:.4e} max|.| {max:.4e}",
                out.output.size(),
                out.bias.as_ref().map(|b| b.size())
            );
            println!(
                "layer {number}: forward {forward_ms:.3} ms, forward+backward {forward_backward_ms:.3} ms, \
                 |grad hidden_states| {grad_norm:.4e}"
            );
        }
        layers.push(json!({
            "layer_number": number,
            "output_mean": mean, "output_std": std, "output_abs_max": max,
            "forward_ms": forward_ms, "forward_backward_ms": forward_backward_ms,
        }));
    }
    Ok(json!({ "batch": b, "seq_len": s, "layers": layers }))
}

/// The self-attention layers, or `None` for models with cross attention.
fn self_attention_stack(built: &BuiltLayers) -> Option<Vec<&SelfAttention>> {
    built
        .layers
        .iter()
        .map(|(_, _, a)| match a {
            Attention::SelfAttention(s) => Some(s),
            Attention::CrossAttention(_) => None,
        })
        .collect()
}

fn step(
    stack: &[&SelfAttention],
    x: &Tensor,
    rope: Option<&Tensor>,
    ctx: &mut dyn InferenceContext,
) -> Result<Tensor> {
    let mut h = x.shallow_clone();
    for layer in stack {
        let mut input = AttentionInput::new(&h);
        if let Some(r) = rope {
            input = input.with_rotary(r);
        }
        h = with_bias(layer.forward_with_context(&input, ctx)?);
    }
    Ok(h)
}

fn full_forward(stack: &[&SelfAttention], x: &Tensor, rope: Option<&Tensor>) -> Result<Tensor> {
    let mut h = x.shallow_clone();
    for layer in stack {
        let mut input = AttentionInput::new(&h);
        if let Some(r) = rope {
            input = input.with_rotary(r);
        }
        h = with_bias(layer.forward(&input)?);
    }
    Ok(h)
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

struct Phase {
    tokens: i64,
    seconds: f64,
}

impl Phase {
    fn tokens_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.tokens as f64 / self.seconds } else { 0.0 }
    }
}

fn context_json(prefill: &Phase, decode: &Phase, kv_bytes: i64, err: f64) -> serde_json::Value {
    json!({
        "prefill_tokens_per_s": prefill.tokens_per_s(),
        "decode_tokens_per_s": decode.tokens_per_s(),
        "kv_cache_bytes": kv_bytes,
        "max_abs_err_vs_full_forward": err,
    })
}

/// Prefill + decode in both contexts against the full forward; prints the report unless
/// `quiet`.
fn inference(
    args: &RunArgs,
    model: &Model,
    stack: &[&SelfAttention],
    device: Device,
    quiet: bool,
) -> Result<serde_json::Value> {
    let c = &model.config;
    let (p, d, b, h) = (args.prompt_len, args.decode_steps, args.batch, c.hidden_size);
    let total = p + d;
    let kind = c.params_dtype.kind();
    let rope = (c.position_embedding_type == PositionEmbeddingType::Rope)
        .then(|| RotaryEmbedding::from_config(c).forward(total, 0, device));
    let rope = rope.as_ref();
    let _guard = tch::no_grad_guard();
    // The tokens every context sees, and the reference.
    let x = Tensor::randn([total, b, h], (kind, device)) * 0.5;
    let full = full_forward(stack, &x, rope)?;

    // Static context: one batch, prefill then single-token decode steps.
    let kernels = cuda_kernels(args, model, device);
    let mut ctx = StaticInferenceContext::new(b, total)?;
    #[cfg(feature = "cuda")]
    if kernels {
        ctx.set_flash_decode(Box::new(attention_cuda::decode::CudaFlashDecode::default()));
    }
    sync(device);
    let t0 = Instant::now();
    let pre = step(stack, &x.narrow(0, 0, p), rope, &mut ctx)?;
    ctx.advance(p)?;
    sync(device);
    let static_prefill = Phase { tokens: p * b, seconds: t0.elapsed().as_secs_f64() };
    ctx.enable_decode_mode();
    let t0 = Instant::now();
    let mut outs = vec![pre];
    for i in 0..d {
        outs.push(step(stack, &x.narrow(0, p + i, 1), rope, &mut ctx)?);
        ctx.advance(1)?;
    }
    sync(device);
    let static_decode = Phase { tokens: d * b, seconds: t0.elapsed().as_secs_f64() };
    let static_err = max_err(&Tensor::cat(&outs, 0), &full);
    let static_json = context_json(&static_prefill, &static_decode, ctx.memory_bytes(), static_err);

    // Dynamic context: the same prompts as b requests, token-flattened steps.
    let blocks_per_request = (total + args.block_size - 1) / args.block_size;
    let mut options = DynamicContextOptions::new(
        stack.len() as i64,
        args.block_size,
        KvMemory::Blocks(blocks_per_request * b),
    );
    options.pp_layer_offset = stack.first().map_or(0, |l| l.layer_number() - 1);
    if kernels {
        options.paged_attention = "paged-attention-cuda".into();
    }
    let mut dctx =
        DynamicInferenceContext::new(c, &options, kind, device, attention_core::registry()?)?;
    for r in 0..b {
        dctx.add_request(r as u64, p)?;
    }
    let mut got: Vec<Vec<Tensor>> = (0..b).map(|_| Vec::new()).collect();
    let (mut dyn_prefill, mut dyn_decode) =
        (Phase { tokens: 0, seconds: 0.0 }, Phase { tokens: 0, seconds: 0.0 });
    loop {
        let plan = dctx.schedule(args.token_budget)?;
        if plan.is_empty() {
            bail!(
                "the paged context scheduled nothing with a token budget of {}",
                args.token_budget
            );
        }
        let parts: Vec<Tensor> = plan
            .entries
            .iter()
            .map(|e| x.narrow(0, e.start, e.tokens).select(1, e.id as i64).unsqueeze(1))
            .collect();
        sync(device);
        let t0 = Instant::now();
        let out = step(stack, &Tensor::cat(&parts, 0), rope, &mut dctx)?;
        sync(device);
        let secs = t0.elapsed().as_secs_f64();
        dctx.commit_step()?;
        let phase =
            if plan.entries.iter().any(|e| !e.decode) { &mut dyn_prefill } else { &mut dyn_decode };
        phase.tokens += plan.total_tokens();
        phase.seconds += secs;
        let mut row = 0;
        for e in &plan.entries {
            got[e.id as usize].push(out.narrow(0, row, e.tokens));
            row += e.tokens;
            if e.start + e.tokens == total {
                dctx.finish_request(e.id)?;
            }
        }
        if dctx.request_ids().is_empty() {
            break;
        }
    }
    let dyn_out = Tensor::stack(&got.iter().map(|g| Tensor::cat(g, 0)).collect::<Vec<_>>(), 1);
    let dyn_err = max_err(&dyn_out.squeeze_dim(2), &full);
    let dynamic_json = context_json(&dyn_prefill, &dyn_decode, dctx.memory_bytes(), dyn_err);

    if !args.json && !quiet {
        println!(
            "inference: batch {b}, prompt {p}, decode {d}, block size {}, token budget {}, {}",
            args.block_size,
            args.token_budget,
            if kernels {
                "attention-cuda kernels (flash_decode, paged-attention-cuda)"
            } else {
                "libtorch ops"
            }
        );
        for (name, j) in [("static", &static_json), ("dynamic", &dynamic_json)] {
            println!(
                "{name:>8}: prefill {:.0} tokens/s, decode {:.0} tokens/s, KV {} bytes, max |err| vs full forward {:.3e}",
                j["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
                j["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                j["kv_cache_bytes"],
                j["max_abs_err_vs_full_forward"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    let kernels = if kernels { "attention-cuda" } else { "libtorch" };
    Ok(json!({ "static": static_json, "dynamic": dynamic_json, "inference_kernels": kernels }))
}

pub(crate) fn run(args: &RunArgs) -> Result<()> {
    for (name, v) in [
        ("--seq-len", args.seq_len),
        ("--batch", args.batch),
        ("--prompt-len", args.prompt_len),
        ("--block-size", args.block_size),
        ("--token-budget", args.token_budget),
        ("--iters", args.iters as i64),
    ] {
        if v < 1 {
            bail!("{name} must be at least 1, got {v}");
        }
    }
    if args.decode_steps < 0 {
        bail!("--decode-steps must be at least 0, got {}", args.decode_steps);
    }
    let device = parse_device(&args.device)?;
    tch::manual_seed(args.seed);
    let (source, model) = load_model(args.config.as_ref())?;
    let vs = VarStore::new(device);
    let built =
        BuiltLayers::build(&vs.root(), &model).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    if !args.json {
        print_tree(&source, &model, &vs, &built, false);
        println!("device {device:?}");
    }
    let training = training(args, &model, &built, device)?;
    let inference = match self_attention_stack(&built) {
        Some(stack) => {
            // attention-cuda compiles its kernels on first use (NVRTC, seconds): one untimed
            // pass first, so the timed one measures the kernels, not the compiler.
            if cuda_kernels(args, &model, device) {
                inference(args, &model, &stack, device, true)?;
            }
            Some(inference(args, &model, &stack, device, false)?)
        }
        None => {
            if !args.json {
                println!(
                    "inference: skipped (KV-cache contexts serve self attention; this model has cross attention)"
                );
            }
            None
        }
    };
    if args.json {
        let mut out =
            json!({ "config": source, "device": format!("{device:?}"), "training": training });
        if let Some(serde_json::Value::Object(map)) = inference {
            for (k, v) in map {
                out[k] = v;
            }
        }
        println!("{out}");
    }
    Ok(())
}
