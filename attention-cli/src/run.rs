//! `attn run`: the main job.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use attention_core::{Attention, AttentionInput, BuiltLayers, RotaryEmbedding};
use attention_spec::AttnMaskType;
use attention_spec::config::PositionEmbeddingType;
use clap::Args;
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
    /// Sequence length of the random batch.
    #[arg(long, default_value_t = 256)]
    seq_len: i64,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: i64,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: i64,
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

pub(crate) fn run(args: &RunArgs) -> Result<()> {
    if args.seq_len < 1 || args.batch < 1 || args.iters < 1 {
        bail!("--seq-len, --batch and --iters must be at least 1");
    }
    let device = parse_device(&args.device)?;
    tch::manual_seed(args.seed);
    let (source, model) = load_model(args.config.as_ref())?;
    let vs = VarStore::new(device);
    let built =
        BuiltLayers::build(&vs.root(), &model).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    print_tree(&source, &model, &vs, &built, false);

    let c = &model.config;
    let (s, b, h) = (args.seq_len, args.batch, c.hidden_size);
    let kind = c.params_dtype.kind();
    let rope = (c.position_embedding_type == PositionEmbeddingType::Rope)
        .then(|| RotaryEmbedding::from_config(c).forward(s, 0, device));
    println!(
        "device {device:?}, batch {b}, seq_len {s}, dtype {kind:?}, rotary {}",
        rope.is_some()
    );
    for ((number, _, attn), layer) in built.layers.iter().zip(&model.layers) {
        let x = Tensor::randn([s, b, h], (kind, device)).set_requires_grad(true);
        let kv = attn
            .is_cross()
            .then(|| Tensor::randn([s, b, h], (kind, device)).set_requires_grad(true));
        let mask = match layer.attention.attn_mask_type {
            AttnMaskType::Padding | AttnMaskType::PaddingCausal => {
                Some(padding_mask(b, s, s, attn.is_cross(), device))
            }
            _ => None,
        };
        let grad_out = Tensor::randn([s, b, h], (kind, device));
        let mut inp = AttentionInput::new(&x).training(true);
        if let Some(kv) = &kv {
            inp = inp.with_key_value_states(kv);
        }
        if let Some(m) = &mask {
            inp = inp.with_mask(m);
        }
        if let Some(r) = &rope {
            inp = inp.with_rotary(r);
        }
        let out = attn.forward(&inp)?;
        let o = out.output.to_kind(Kind::Float);
        println!(
            "layer {number}: output {:?} bias {:?}  mean {:+.4e} std {:.4e} max|.| {:.4e}",
            out.output.size(),
            out.bias.as_ref().map(|b| b.size()),
            o.mean(Kind::Float).double_value(&[]),
            o.std(true).double_value(&[]),
            o.abs().max().double_value(&[]),
        );
        let fwd = time_ms(device, args.iters, || tch::no_grad(|| forward(attn, &inp).map(|_| ())))?;
        let fwd_bwd = time_ms(device, args.iters, || {
            let out = forward(attn, &inp)?;
            let total = match &out.bias {
                Some(bias) => &out.output + bias,
                None => out.output,
            };
            (total * &grad_out).sum(Kind::Float).backward();
            Ok(())
        })?;
        let gx = x.grad().to_kind(Kind::Float);
        println!(
            "layer {number}: forward {fwd:.3} ms, forward+backward {fwd_bwd:.3} ms, |grad hidden_states| {:.4e}",
            gx.norm().double_value(&[])
        );
    }
    Ok(())
}

fn forward(
    attn: &Attention,
    input: &AttentionInput<'_>,
) -> Result<attention_core::AttentionOutput> {
    Ok(attn.forward(input)?)
}
