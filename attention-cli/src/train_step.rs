//! `attn train-step`: training steps of the attention stack on random data, with the training
//! extras switched on by flags: selective recompute of core attention, delayed weight
//! gradients (`backward_dw` after each backward), QK-Clip after each optimizer step, realtime
//! consistency checks. Prints loss, max attention logits, clip factors, peak memory and time
//! per step.
//!
//! Peak memory: on CUDA the caching allocator's peak of allocated bytes during the step; on the
//! CPU the growth of the process's peak resident set during the step (`VmHWM`, reset before
//! each step through `/proc/self/clear_refs`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use attention_core::{Attention, AttentionInput, BuiltLayers, RotaryEmbedding};
use attention_spec::config::{PositionEmbeddingType, RecomputeGranularity};
use attention_spec::{ModelSpec, TransformerConfigSpec};
use clap::Args;
use serde_json::json;
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::{DEFAULT_CONFIG, parse_device};

/// Options of `attn train-step`.
#[derive(Args)]
pub(crate) struct TrainStepArgs {
    /// Model file; the embedded default when absent.
    config: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Training steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: i64,
    /// Sequence length.
    #[arg(long, default_value_t = 256)]
    seq_len: i64,
    /// Override `num_layers` (files without `[[layers]]` then get layers 1..=N).
    #[arg(long)]
    num_layers: Option<i64>,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.5)]
    lr: f64,
    /// Selective recompute of core attention (recompute_granularity = "selective").
    #[arg(long)]
    recompute: bool,
    /// Delayed weight gradients (delay_wgrad_compute = true; backward_dw after each backward).
    #[arg(long)]
    delay_wgrad: bool,
    /// QK-Clip (qk_clip = true; clip_qk after each optimizer step).
    #[arg(long)]
    qk_clip: bool,
    /// QK-Clip threshold τ.
    #[arg(long)]
    qk_clip_threshold: Option<f64>,
    /// Realtime consistency checks in every forward (test_mode = true).
    #[arg(long)]
    test_mode: bool,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Peak memory of a step, in bytes.
struct PeakMemory {
    device: Device,
    baseline: i64,
}

fn proc_status_kib(field: &str) -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl PeakMemory {
    fn start(device: Device) -> Result<Self> {
        let baseline = match device {
            Device::Cuda(i) => attention_core::autograd::device_memory(i, true)?.0,
            _ => {
                // Reset the peak resident set to the current one.
                std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
                proc_status_kib("VmRSS:").context("VmRSS")? * 1024
            }
        };
        Ok(Self { device, baseline })
    }

    fn peak(&self) -> Result<i64> {
        Ok(match self.device {
            Device::Cuda(i) => attention_core::autograd::device_memory(i, false)?.1 - self.baseline,
            _ => proc_status_kib("VmHWM:").context("VmHWM")? * 1024 - self.baseline,
        })
    }
}

fn with_bias(out: attention_core::AttentionOutput) -> Tensor {
    match out.bias {
        Some(b) => out.output + b,
        None => out.output,
    }
}

pub(crate) fn train_step(args: &TrainStepArgs) -> Result<()> {
    if args.steps < 1 || args.batch < 1 || args.seq_len < 1 {
        bail!("--steps, --batch and --seq-len must be at least 1");
    }
    let device = parse_device(&args.device)?;
    tch::manual_seed(args.seed);
    let (source, text) = match &args.config {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => ("<default>".to_string(), DEFAULT_CONFIG.to_string()),
    };
    let mut spec = ModelSpec::from_toml_str(&text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    let t: &mut TransformerConfigSpec =
        spec.transformer.as_mut().context("the model file has no [transformer]")?;
    if args.recompute {
        t.recompute_granularity = Some(RecomputeGranularity::Selective);
    }
    t.delay_wgrad_compute |= args.delay_wgrad;
    t.qk_clip |= args.qk_clip;
    if let Some(tau) = args.qk_clip_threshold {
        t.qk_clip_threshold = tau;
    }
    t.test_mode |= args.test_mode;
    if let Some(n) = args.num_layers {
        t.num_layers = Some(n);
    }
    let model = spec
        .resolve(attention_core::registry()?)
        .map_err(|e| anyhow::anyhow!("{source}: {}", e.locate(&text)))?;
    let c = &model.config;
    let vs = VarStore::new(device);
    let built =
        BuiltLayers::build(&vs.root(), &model).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    let (s, b, h) = (args.seq_len, args.batch, c.hidden_size);
    let kind = c.params_dtype.kind();
    let rope = (c.position_embedding_type == PositionEmbeddingType::Rope)
        .then(|| RotaryEmbedding::from_config(c).forward(s, 0, device));
    if !args.json {
        println!(
            "{source}: {} layers, batch {b}, seq_len {s}, {device:?}; recompute {}, delay_wgrad {}, qk_clip {} (tau {}), test_mode {}",
            built.layers.len(),
            c.checkpoint_core_attention(),
            c.delay_wgrad_compute,
            c.qk_clip,
            c.qk_clip_threshold,
            c.test_mode
        );
    }
    let mut steps = Vec::new();
    for step in 1..=args.steps {
        let x = Tensor::randn([s, b, h], (kind, device));
        let target = Tensor::randn([s, b, h], (kind, device)) * 0.1;
        let mem = PeakMemory::start(device)?;
        let t0 = Instant::now();
        // Forward through the stack, MSE loss, backward.
        let mut hidden = x.shallow_clone();
        for (_, _, attn) in &built.layers {
            let mut input = AttentionInput::new(&hidden).training(true);
            if attn.is_cross() {
                input = input.with_key_value_states(&x);
            }
            if let Some(r) = &rope {
                input = input.with_rotary(r);
            }
            hidden = with_bias(attn.forward(&input)?);
        }
        let loss = (&hidden - &target).square().mean(Kind::Float);
        loss.f_backward()?;
        // Delayed weight gradients, then SGD.
        let mut deferred = 0;
        for (_, _, attn) in &built.layers {
            if let Attention::SelfAttention(a) = attn {
                deferred += a.backward_dw()?;
            }
        }
        tch::no_grad(|| {
            for mut p in vs.trainable_variables() {
                let g = p.grad();
                if g.defined() {
                    let _ = p.f_sub_(&(g * args.lr))?;
                    p.zero_grad();
                }
            }
            Ok::<_, tch::TchError>(())
        })?;
        // QK-Clip after the optimizer step.
        let mut max_logits = Vec::new();
        let mut factors = Vec::new();
        for (n, _, attn) in &built.layers {
            if let (Attention::SelfAttention(a), true) = (attn, c.qk_clip) {
                let report = a.clip_qk()?;
                max_logits
                    .push(json!({"layer": n, "max": report.max_logits.max().double_value(&[])}));
                factors.push(json!({"layer": n, "min_factor": report.head_factors.min().double_value(&[]), "clipped": report.clipped}));
            }
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let peak = mem.peak()?;
        let loss = loss.double_value(&[]);
        if !args.json {
            let logits: Vec<String> = max_logits
                .iter()
                .map(|v| format!("l{}: {:.3}", v["layer"], v["max"].as_f64().unwrap_or(f64::NAN)))
                .collect();
            let fac: Vec<String> = factors
                .iter()
                .map(|v| {
                    format!("l{}: {:.4}", v["layer"], v["min_factor"].as_f64().unwrap_or(f64::NAN))
                })
                .collect();
            println!(
                "step {step}: loss {loss:.6}, max logits [{}], clip factors [{}], deferred wgrads {deferred}, peak memory {:.1} MiB, {ms:.1} ms",
                logits.join(", "),
                fac.join(", "),
                peak as f64 / (1 << 20) as f64
            );
        }
        steps.push(json!({
            "step": step, "loss": loss, "max_logits": max_logits, "clip_factors": factors,
            "deferred_wgrads": deferred, "peak_memory_bytes": peak, "ms": ms,
        }));
    }
    if args.json {
        println!(
            "{}",
            json!({ "config": source, "device": format!("{device:?}"), "steps": steps })
        );
    }
    Ok(())
}
