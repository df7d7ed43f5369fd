//! `attn bench`: the CUDA paths against their baselines, side by side in one process on one GPU
//! (needs the `cuda` feature). Prints a table and writes JSON.
//!
//! * copy: a device-to-device copy, the bandwidth ceiling (bytes read + written);
//! * prefill: forward and forward+backward TFLOP/s of the `sdpa-cuda` core attention (from
//!   Megatron's `[s, b, h, d]` layout) against PyTorch SDPA's default backend on
//!   `[B, S, H, D]` memory viewed `[B, H, S, D]`, B·S = 16k, H·D = 2048, and against the
//!   generic `sdpa` kind on the same inputs as ours;
//! * prefill-short: the same for one sequence of 128 to 512 tokens (B = 1), where a call's
//!   host work is as long as its kernel;
//! * flash_decode: the fused static-cache decode step against SDPA decode on contiguous keys and
//!   values (no rotary, no append), SDPA decode on the static cache's own memory, and the same
//!   step done with libtorch ops (rotary, index copy, SDPA); bytes = keys + values read, q/o,
//!   new k/v written; and in a cache longer than the context, launched by the host's offset
//!   bound against by the cache's length and replayed from CUDA graphs captured at that context
//!   and at an eighth of it;
//! * paged decode: `paged-attention-cuda` against gathering the pages and running SDPA;
//! * mixed step: 64 decode requests plus one 2048-token prefill chunk in one call, against the
//!   two parts in two calls and against the one call on the tensor-core kernel: a continued
//!   chunk and a prompt's first chunk (both of which the automatic path attends with
//!   libtorch's kernels);
//! * paged prefill: whole prompts (one, or several of one length; head dimension 128, and 64
//!   for one prompt of 1024 or 4096) through `paged-attention-cuda` (each kernel path; the
//!   automatic one takes libtorch's kernels from 1024 tokens at head dimension 128, 2048 at 64)
//!   against SDPA on contiguous memory, causal; and a prompt's later chunk alone (512 to 4096
//!   new tokens on 1024 to 6144 cached ones) on the automatic path (cuDNN twice and a merge from
//!   20 GFLOP of work), our kernel and the route at any size, against libtorch's
//!   variable-length flash forward on contiguous memory (bottom-right causal).
//!
//! Time: each function of a case (ours and its baselines) runs `iters` times between device
//! synchronisations, repeated `reps` times in rounds that take every function of the case in
//! turn (so clock and thermal drift during the case fall on all of them alike), each round
//! starting one function later than the one before (so none always runs first), after the
//! case's functions have run in turn for 200 ms (so the clocks an idle GPU boosts for its first
//! milliseconds of load have settled); the median repeat is reported. The JSON also records
//! the GPU and driver, the UTC date, and the commit HEAD named when the binary was built
//! (uncommitted changes are not recorded).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Options of `attn bench`.
#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Which groups to run: prefill, prefill-short, decode, paged, mixed (default: all; the copy
    /// always runs).
    #[arg(long = "only")]
    only: Vec<String>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench.json")]
    json_out: PathBuf,
    /// Device: cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Timed repeats per case (the median is reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn bench(_args: &BenchArgs) -> Result<()> {
    anyhow::bail!(
        "attn bench needs a build with the `cuda` feature (cargo build --release -p attention-cli --features cuda)"
    )
}

#[cfg(feature = "cuda")]
pub(crate) fn bench(args: &BenchArgs) -> Result<()> {
    imp::bench(args)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use attention_core::inference::{RotaryCosSin, StaticDecodeStep};
    use attention_core::rotary::apply_rotary_pos_emb;
    use attention_cuda::decode::{
        CudaFlashDecode, CudaPagedAttention, KernelPath, PROMPT_ROUTE_MIN_TOKENS,
    };
    use attention_cuda::graph::CudaGraph;
    use attention_spec::module::{
        AttnMaskType, ContinuedChunk, CoreAttention, CoreAttentionInput, PackedSeqParams, PagedKv,
        PromptTail,
    };
    use serde_json::{Value, json};
    use tch::{Device, Kind, Tensor};

    use super::BenchArgs;
    use crate::parse_device;

    fn sync(device: Device) {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// A function to time: calls per repeat, and the call.
    type Timed<'a> = (usize, Box<dyn FnMut() -> Result<()> + 'a>);

    /// A [`Timed`] from its calls per repeat and a closure.
    fn timed<'a>(iters: usize, f: impl FnMut() -> Result<()> + 'a) -> Timed<'a> {
        (iters, Box::new(f))
    }

    /// How long the functions of a [`time_each`] run before they are timed. A GPU that has
    /// idled (while a case's inputs are made) boosts its clocks for the first milliseconds of
    /// load and then settles at its sustained power limit: timed from a cold start, whichever
    /// function runs first gains up to an eighth (seen on an H200, `benchmarks/aa-probe.py`).
    const WARM_UP: Duration = Duration::from_millis(200);

    /// Median seconds per call of each function over `reps` rounds; a round times every
    /// function in turn, `iters` calls between device synchronisations, round `r` from
    /// function `r % fs.len()` on. Before the rounds, the functions run in turn (each at least
    /// twice) until [`WARM_UP`] has passed.
    fn time_each(device: Device, reps: usize, fs: &mut [Timed<'_>]) -> Result<Vec<f64>> {
        let start = Instant::now();
        for round in 0.. {
            for (_, f) in fs.iter_mut() {
                f()?;
            }
            sync(device);
            if round >= 1 && start.elapsed() >= WARM_UP {
                break;
            }
        }
        let n = fs.len();
        let mut t = vec![Vec::with_capacity(reps); n];
        for r in 0..reps {
            for i in (0..n).map(|j| (r + j) % n) {
                let ((iters, f), t) = (&mut fs[i], &mut t[i]);
                let s = Instant::now();
                for _ in 0..*iters {
                    f()?;
                }
                sync(device);
                t.push(s.elapsed().as_secs_f64() / *iters as f64);
            }
        }
        Ok(t.into_iter()
            .map(|mut t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            })
            .collect())
    }

    /// Median seconds per call of one function over `reps` repeats of `iters` calls.
    fn time(
        device: Device,
        reps: usize,
        iters: usize,
        f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        Ok(time_each(device, reps, &mut [timed(iters, f)])?[0])
    }

    struct Report {
        rows: Vec<Value>,
    }

    impl Report {
        fn add(
            &mut self,
            group: &str,
            case: String,
            ours: (&str, f64),
            baselines: &[(&str, f64)],
            unit: &str,
        ) {
            let mut line = format!("{group:<8} {case:<34} {:>14} {:>10.1} {unit}", ours.0, ours.1);
            let mut j = json!({"group": group, "case": case, "unit": unit, "ours": {"name": ours.0, "value": ours.1}, "baselines": []});
            for (name, v) in baselines {
                let ratio = if *v > 0.0 { ours.1 / v } else { f64::NAN };
                line += &format!(" | {name} {v:.1} (x{ratio:.2})");
                if let Some(a) = j["baselines"].as_array_mut() {
                    a.push(json!({"name": name, "value": v, "ratio": ratio}));
                }
            }
            println!("{line}");
            self.rows.push(j);
        }
    }

    fn bf16(shape: &[i64], device: Device) -> Tensor {
        Tensor::randn(shape, (Kind::BFloat16, device))
    }

    fn copy_bandwidth(device: Device, reps: usize) -> Result<f64> {
        let n = 1i64 << 30; // 2 GiB of bf16
        let a = bf16(&[n], device);
        let mut b = Tensor::empty([n], (Kind::BFloat16, device));
        let t = time(device, reps, 5, || {
            b.copy_(&a);
            Ok(())
        })?;
        Ok(2.0 * (n * 2) as f64 / t / 1e9)
    }

    pub(super) fn bench(args: &BenchArgs) -> Result<()> {
        let device = parse_device(&args.device)?;
        attention_cuda::require_cuda(device)?;
        attention_cuda::link();
        let want = |g: &str| args.only.is_empty() || args.only.iter().any(|o| o == g);
        let reps = args.reps.max(3);
        let mut report = Report { rows: Vec::new() };
        let _guard = tch::no_grad_guard();
        println!(
            "{:<8} {:<34} {:>14} {:>10} unit | baselines (ratio ours/baseline)",
            "group", "case", "ours", "value"
        );
        let copy = copy_bandwidth(device, reps)?;
        report.add("copy", "device-to-device 2 GiB".into(), ("copy", copy), &[], "GB/s");
        if want("prefill") {
            prefill(device, reps, "prefill", &PREFILL_SHAPES, &mut report)?;
        }
        if want("prefill-short") {
            prefill(device, reps, "prefill-short", &SHORT_PREFILL_SHAPES, &mut report)?;
        }
        if want("decode") {
            decode(device, reps, copy, &mut report)?;
            decode_in_long_cache(device, reps, copy, &mut report)?;
        }
        if want("paged") {
            paged(device, reps, copy, &mut report)?;
        }
        if want("mixed") {
            mixed(device, reps, &mut report)?;
        }
        let gpu = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let commit = env!("ATTN_GIT_COMMIT");
        let out = json!({"gpu": gpu, "date": date, "commit": commit, "copy_gb_per_s": copy, "results": report.rows});
        std::fs::write(&args.json_out, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", args.json_out.display()))?;
        println!(
            "GPU: {gpu}; {date}; built from commit {commit}; JSON written to {}",
            args.json_out.display()
        );
        Ok(())
    }

    fn core(
        kind: &str,
        heads: i64,
        groups: i64,
        hd: i64,
        causal: bool,
    ) -> Result<Box<dyn CoreAttention>> {
        let toml = format!(
            "[transformer]\nhidden_size = {}\nnum_attention_heads = {heads}\nnum_query_groups = {groups}\nkv_channels = {hd}\n\
             attention_dropout = 0.0\nparams_dtype = \"bfloat16\"\nbf16 = true\n[attention]\npreset = \"gpt-local\"\n\
             params = {{ attn_mask_type = \"{}\" }}\nsubmodules = {{ core_attention = \"{kind}\" }}\n",
            heads * hd,
            if causal { "causal" } else { "no_mask" }
        );
        let model = attention_spec::Model::from_toml_str(&toml, attention_core::registry()?)?;
        let attention_spec::spec::AttentionSubmodules::SelfAttention(s) =
            &model.layers[0].attention.submodules
        else {
            bail!("self attention expected");
        };
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let args = attention_spec::registry::CoreAttentionArgs {
            path: &vs.root(),
            config: &model.config,
            params: &s.core_attention.params,
            layer_number: 1,
            attn_mask_type: model.layers[0].attention.attn_mask_type,
            attention_type: attention_spec::module::AttentionType::SelfAttention,
        };
        match s.core_attention.factory.builder {
            attention_spec::registry::Builder::CoreAttention(f) => Ok(f(&args)?),
            _ => bail!("not a core attention"),
        }
    }

    /// Prefill shapes: 16384 tokens per call from sequence 512 to 16384 (`prefill`), and one
    /// sequence of 128 to 512 tokens (`prefill-short`), where a call's host work is as long as
    /// its kernel.
    const PREFILL_SHAPES: [(i64, i64); 6] =
        [(512, 32), (1024, 16), (2048, 8), (4096, 4), (8192, 2), (16384, 1)];
    const SHORT_PREFILL_SHAPES: [(i64, i64); 3] = [(128, 1), (256, 1), (512, 1)];

    /// Prompts (count, tokens each, head dimension) of the paged prefill cases.
    const PAGED_PROMPTS: [(i64, i64, i64); 10] = [
        (1, 1024, 128),
        (1, 4096, 128),
        (1, 128, 128),
        (1, 256, 128),
        (1, 512, 128),
        (4, 1024, 128),
        (16, 256, 128),
        (64, 64, 128),
        (1, 1024, 64),
        (1, 4096, 64),
    ];

    /// Prompt chunks (new tokens, cached tokens, head dimension) of the paged chunk cases.
    const PAGED_CHUNKS: [(i64, i64, i64); 14] = [
        (128, 4096, 128),
        (256, 1024, 128),
        (256, 4096, 128),
        (512, 1536, 128),
        (512, 3584, 128),
        (1024, 1024, 128),
        (1024, 3072, 128),
        (2048, 2048, 128),
        (2048, 6144, 128),
        (4096, 4096, 128),
        (512, 3584, 64),
        (1024, 3072, 64),
        (2048, 2048, 64),
        (4096, 4096, 64),
    ];

    /// Core attention forward and forward+backward, `sdpa-cuda` against libtorch's SDPA called
    /// directly and against the generic `sdpa` kind, for (sequence, batch) `shapes`.
    fn prefill(
        device: Device,
        reps: usize,
        group: &str,
        shapes: &[(i64, i64)],
        report: &mut Report,
    ) -> Result<()> {
        for hd in [128i64, 64] {
            let h = 2048 / hd;
            for causal in [false, true] {
                for &(s, b) in shapes {
                    let flops = 4.0 * (b * h * s * s * hd) as f64 * if causal { 0.5 } else { 1.0 };
                    // Baseline: SDPA default on [B, S, H, D] memory viewed [B, H, S, D].
                    let mk =
                        || bf16(&[b, s, h, hd], device).transpose(1, 2).set_requires_grad(true);
                    let (q, k, v) = (mk(), mk(), mk());
                    let g = bf16(&[b, h, s, hd], device);
                    // Ours: the sdpa-cuda core attention on Megatron's [s, b, h, d].
                    let attn = core("sdpa-cuda", h, h, hd, causal)?;
                    // The generic `sdpa` kind on the same inputs: the same libtorch call through
                    // tch's views and libtorch's backend choice on every call.
                    let generic = core("sdpa", h, h, hd, causal)?;
                    let mk2 = || bf16(&[s, b, h, hd], device).set_requires_grad(true);
                    let (q2, k2, v2) = (mk2(), mk2(), mk2());
                    let g2 = bf16(&[s, b, h * hd], device);
                    let mask = if causal { AttnMaskType::Causal } else { AttnMaskType::NoMask };
                    let input = CoreAttentionInput::new(&q2, &k2, &v2, mask);
                    let fwd = time_each(
                        device,
                        reps,
                        &mut [
                            timed(10, || {
                                let _ = run_sdpa(&q, &k, &v, causal, false);
                                Ok(())
                            }),
                            timed(10, || {
                                let _ = attn.forward(&input)?;
                                Ok(())
                            }),
                            timed(10, || {
                                let _ = generic.forward(&input)?;
                                Ok(())
                            }),
                        ],
                    )?;
                    let fb = tch::with_grad(|| {
                        time_each(
                            device,
                            reps,
                            &mut [
                                timed(5, || {
                                    let o = run_sdpa(&q, &k, &v, causal, false);
                                    (o * &g).sum(Kind::Float).backward();
                                    Ok(())
                                }),
                                timed(5, || {
                                    (attn.forward(&input)? * &g2).sum(Kind::Float).backward();
                                    Ok(())
                                }),
                                timed(5, || {
                                    (generic.forward(&input)? * &g2).sum(Kind::Float).backward();
                                    Ok(())
                                }),
                            ],
                        )
                    })?;
                    let (base, ours, base_fb, ours_fb) = (fwd[0], fwd[1], fb[0], fb[1]);
                    let (generic_fwd, generic_fb) = (fwd[2], fb[2]);
                    let backend = attn.backend().unwrap_or_default();
                    let case = format!(
                        "hd{hd} {} s{s} b{b} [{backend}]",
                        if causal { "causal" } else { "full" }
                    );
                    report.add(
                        group,
                        format!("{case} fwd"),
                        ("sdpa-cuda", flops / ours / 1e12),
                        &[
                            ("sdpa default", flops / base / 1e12),
                            ("sdpa kind", flops / generic_fwd / 1e12),
                        ],
                        "TFLOP/s",
                    );
                    report.add(
                        group,
                        format!("{case} fwd+bwd"),
                        ("sdpa-cuda", 3.5 * flops / ours_fb / 1e12),
                        &[
                            ("sdpa default", 3.5 * flops / base_fb / 1e12),
                            ("sdpa kind", 3.5 * flops / generic_fb / 1e12),
                        ],
                        "TFLOP/s",
                    );
                }
            }
        }
        Ok(())
    }

    /// libtorch SDPA without mask or dropout, at the default scale; `gqa` lets fewer key/value
    /// heads serve the query heads.
    fn run_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, gqa: bool) -> Tensor {
        Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, causal, None, gqa)
    }

    /// Bytes a decode step moves: keys and values read, the query and output, the new key
    /// and value written.
    fn decode_bytes(b: i64, l: i64, hq: i64, hkv: i64, hd: i64) -> f64 {
        (2 * b * l * hkv * hd * 2 + 2 * b * hq * hd * 2 + 2 * b * hkv * hd * 2) as f64
    }

    /// SDPA decode on contiguous `[B, L, Hkv, D]` memory (no rotary, no append), bf16: its
    /// query, keys and values viewed `[B, H, L, D]`.
    struct SdpaDecode {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gqa: bool,
    }

    impl SdpaDecode {
        fn new(device: Device, (b, l, hq, hkv, hd): (i64, i64, i64, i64, i64)) -> Self {
            let k = bf16(&[b, l, hkv, hd], device).transpose(1, 2);
            let v = bf16(&[b, l, hkv, hd], device).transpose(1, 2);
            let q = bf16(&[b, 1, hq, hd], device).transpose(1, 2);
            Self { q, k, v, gqa: hq != hkv }
        }

        /// One step.
        fn run(&self) -> Result<()> {
            let _ = run_sdpa(&self.q, &self.k, &self.v, false, self.gqa);
            Ok(())
        }
    }

    const DECODE_SHAPES: [(i64, i64); 4] = [(1, 131072), (8, 16384), (32, 4096), (128, 1024)];

    fn decode(device: Device, reps: usize, copy: f64, report: &mut Report) -> Result<()> {
        let hd = 128;
        for (hq, hkv) in [(32i64, 8i64), (32, 32)] {
            for (b, l) in DECODE_SHAPES {
                // Static cache [max_seq, max_batch, hkv, hd] holding l - 1 tokens; the step adds one.
                let kc = bf16(&[l, b, hkv, hd], device);
                let vc = bf16(&[l, b, hkv, hd], device);
                let q = bf16(&[1, b, hq, hd], device);
                let k = bf16(&[1, b, hkv, hd], device);
                let v = bf16(&[1, b, hkv, hd], device);
                let offsets = Tensor::full([b], l - 1, (Kind::Int, device));
                let freqs = Tensor::rand([l, hd / 2], (Kind::Float, device)) * (l as f64);
                let (cos, sin) = (freqs.cos(), freqs.sin());
                let step = StaticDecodeStep {
                    query: &q,
                    key: &k,
                    value: &v,
                    key_cache: &kc,
                    value_cache: &vc,
                    batch_offset: 0,
                    sequence_offsets: &offsets,
                    max_sequence_offset: Some(l - 1),
                    rotary: Some(RotaryCosSin { cos: &cos, sin: &sin, interleaved: false }),
                    softmax_scale: 1.0 / (hd as f64).sqrt(),
                };
                let bytes = decode_bytes(b, l, hq, hkv, hd);
                let run = |kernel: CudaFlashDecode| {
                    let step = &step;
                    timed(20, move || {
                        let _ = kernel.run(step)?;
                        Ok(())
                    })
                };
                let sdpa = SdpaDecode::new(device, (b, l, hq, hkv, hd));
                // SDPA decode on the cache's [L, B, Hkv, D] memory viewed [B, Hkv, L, D] (no
                // rotary, no append): the same bytes in the same layout as the kernel's.
                let [qv, kv, vv] = [&q, &kc, &vc].map(|t| t.permute([1, 2, 0, 3]));
                // The same step with libtorch ops: rotary, index copy into the cache, SDPA.
                let emb = Tensor::cat(&[&freqs, &freqs], -1).view([l, 1, 1, hd]);
                let pos = Tensor::full([1], l - 1, (Kind::Int64, device));
                let mut kc2 = kc.shallow_clone();
                let mut vc2 = vc.shallow_clone();
                let t = time_each(
                    device,
                    reps,
                    &mut [
                        run(CudaFlashDecode::default()),
                        run(KernelPath::CudaCores.into()),
                        run(KernelPath::TensorCores.into()),
                        run(CudaFlashDecode::default().with_programmatic_launch(false)),
                        timed(20, || sdpa.run()),
                        timed(20, || {
                            let _ = run_sdpa(&qv, &kv, &vv, false, hq != hkv);
                            Ok(())
                        }),
                        timed(20, || {
                            let e = emb.index_select(0, &pos);
                            let qr = apply_rotary_pos_emb(&q, &e, false)?;
                            let kr = apply_rotary_pos_emb(&k, &e, false)?;
                            let _ = kc2.index_copy_(0, &pos, &kr);
                            let _ = vc2.index_copy_(0, &pos, &v);
                            // [L, B, Hkv, D] -> [B, Hkv, L, D]
                            let [qp, kp, vp] = [&qr, &kc2, &vc2].map(|t| t.permute([1, 2, 0, 3]));
                            let _ = run_sdpa(&qp, &kp, &vp, false, hq != hkv);
                            Ok(())
                        }),
                    ],
                )?;
                let (ours, cuda_cores, tensor_cores, serial, sdpa, sdpa_cache, ops) =
                    (t[0], t[1], t[2], t[3], t[4], t[5], t[6]);
                let gbs = |t: f64| bytes / t / 1e9;
                report.add(
                    "decode",
                    format!(
                        "{hq}/{hkv} {b}x{l} ({:.0} MB) {:.0}% copy",
                        bytes / 1e6,
                        100.0 * gbs(ours) / copy
                    ),
                    ("flash_decode", gbs(ours)),
                    &[
                        ("cuda cores", gbs(cuda_cores)),
                        ("tensor cores", gbs(tensor_cores)),
                        ("serial launch", gbs(serial)),
                        ("sdpa contiguous", gbs(sdpa)),
                        ("sdpa on the cache", gbs(sdpa_cache)),
                        ("libtorch ops", gbs(ops)),
                    ],
                    "GB/s",
                );
            }
        }
        Ok(())
    }

    /// `flash_decode` in a static cache longer than the context (a generation's cache is sized
    /// for its longest sequence): launched by the host's offset bound against launched by the
    /// cache's length, replayed from CUDA graphs captured at this context and at an eighth of
    /// it, and SDPA decode on the context alone.
    fn decode_in_long_cache(
        device: Device,
        reps: usize,
        copy: f64,
        report: &mut Report,
    ) -> Result<()> {
        let (hq, hkv, hd) = (32i64, 8i64, 128i64);
        for (b, l, cap) in [(1i64, 8192i64, 131072i64), (8, 4096, 32768)] {
            let kc = bf16(&[cap, b, hkv, hd], device);
            let vc = bf16(&[cap, b, hkv, hd], device);
            let q = bf16(&[1, b, hq, hd], device);
            let k = bf16(&[1, b, hkv, hd], device);
            let v = bf16(&[1, b, hkv, hd], device);
            let mut offsets = Tensor::full([b], l - 1, (Kind::Int, device));
            let step = |offsets: &Tensor, bound: Option<i64>| -> Result<()> {
                let step = StaticDecodeStep {
                    query: &q,
                    key: &k,
                    value: &v,
                    key_cache: &kc,
                    value_cache: &vc,
                    batch_offset: 0,
                    sequence_offsets: offsets,
                    max_sequence_offset: bound,
                    rotary: None,
                    softmax_scale: 1.0 / (hd as f64).sqrt(),
                };
                let _ = CudaFlashDecode::default().run(&step)?;
                Ok(())
            };
            // The step captured in a CUDA graph (split-KV sized by the cache's length, each
            // split at least the bound's share), replayed at this context: captured here, and
            // captured at an eighth of it (a generation's graph replayed as it grows).
            let ordinal = match device {
                Device::Cuda(i) => i,
                _ => bail!("not a CUDA device"),
            };
            let mut graph_at = |from: i64| -> Result<CudaGraph> {
                let _ = offsets.fill_(from - 1);
                let (graph, ()) = CudaGraph::capture(ordinal, || step(&offsets, Some(from - 1)))?;
                let _ = offsets.fill_(l - 1);
                Ok(graph)
            };
            let (graph, graph_grown) = (graph_at(l)?, graph_at(l / 8)?);
            let sdpa = SdpaDecode::new(device, (b, l, hq, hkv, hd));
            let t = time_each(
                device,
                reps,
                &mut [
                    timed(20, || step(&offsets, Some(l - 1))),
                    timed(20, || step(&offsets, None)),
                    timed(20, || Ok(graph.replay()?)),
                    timed(20, || Ok(graph_grown.replay()?)),
                    timed(20, || sdpa.run()),
                ],
            )?;
            let (bounded, by_length, graph, graph_grown, sdpa) = (t[0], t[1], t[2], t[3], t[4]);
            let bytes = decode_bytes(b, l, hq, hkv, hd);
            let gbs = |t: f64| bytes / t / 1e9;
            report.add(
                "decode",
                format!(
                    "{hq}/{hkv} {b}x{l} in {cap} ({:.0} MB) {:.0}% copy",
                    bytes / 1e6,
                    100.0 * gbs(bounded) / copy
                ),
                ("flash_decode", gbs(bounded)),
                &[
                    ("sized by cache", gbs(by_length)),
                    ("graph", gbs(graph)),
                    ("graph from l/8", gbs(graph_grown)),
                    ("sdpa contiguous", gbs(sdpa)),
                ],
                "GB/s",
            );
        }
        Ok(())
    }

    /// Paged memory for `b` requests of `l` cached tokens, blocks shuffled.
    struct Paged {
        kc: Tensor,
        vc: Tensor,
        table: Tensor,
        kv_len: Tensor,
        bs: i64,
    }

    fn paged_memory(b: i64, l: i64, hkv: i64, hd: i64, bs: i64, device: Device) -> Paged {
        let per = (l + bs - 1) / bs;
        let nb = b * per + 1;
        let kc = bf16(&[nb, bs, hkv, hd], device);
        let vc = bf16(&[nb, bs, hkv, hd], device);
        let table = Tensor::randperm(nb, (Kind::Int64, device))
            .narrow(0, 0, b * per)
            .view([b, per])
            .to_kind(Kind::Int);
        let kv_len = Tensor::full([b], l, (Kind::Int, device));
        Paged { kc, vc, table, kv_len, bs }
    }

    impl Paged {
        /// Slots (`block * block_size + offset`) of request `r`'s positions `from..from + count`.
        fn slots(&self, r: i64, from: i64, count: i64) -> Tensor {
            let pos = Tensor::arange_start(from, from + count, (Kind::Int64, self.table.device()));
            let blocks = self.table.get(r).to_kind(Kind::Int64);
            blocks.index_select(0, &pos.floor_divide_scalar(self.bs)) * self.bs
                + pos.remainder(self.bs)
        }
    }

    /// The paged kernel on each path (auto, CUDA cores, tensor cores), `iters` calls a repeat,
    /// timed in rounds with `baseline`: seconds per call of the three paths, and of the baseline.
    fn time_paged(
        device: Device,
        reps: usize,
        (kernel, input, pk): (CudaPagedAttention, &CoreAttentionInput<'_>, &PagedKv<'_>),
        iters: usize,
        baseline: Timed<'_>,
    ) -> Result<([f64; 4], f64)> {
        let kernels = [
            kernel,
            kernel.with_path(KernelPath::CudaCores),
            kernel.with_path(KernelPath::TensorCores),
            kernel.with_programmatic_launch(false),
        ];
        let [auto, cores, tensor, serial] = kernels.map(|kernel| {
            timed(iters, move || {
                let _ = kernel.run(input, pk)?;
                Ok(())
            })
        });
        let t = time_each(device, reps, &mut [auto, cores, tensor, serial, baseline])?;
        Ok(([t[0], t[1], t[2], t[3]], t[4]))
    }

    fn paged(device: Device, reps: usize, copy: f64, report: &mut Report) -> Result<()> {
        let hd = 128;
        for bs in [16i64, 256] {
            for (hq, hkv) in [(32i64, 8i64), (32, 32)] {
                for (b, l) in DECODE_SHAPES {
                    let m = paged_memory(b, l, hkv, hd, bs, device);
                    let q = bf16(&[b, 1, hq, hd], device);
                    let k = bf16(&[b, 1, hkv, hd], device);
                    let v = bf16(&[b, 1, hkv, hd], device);
                    let cu_q = Tensor::arange(b + 1, (Kind::Int, device));
                    // Slots of the new tokens: position l - 1 of each request.
                    let last =
                        m.table.narrow(1, (l - 1) / bs, 1).squeeze_dim(1).to_kind(Kind::Int64);
                    let slots = last * bs + (l - 1) % bs;
                    let kernel = CudaPagedAttention::new(1.0 / (hd as f64).sqrt());
                    let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
                    let pk = PagedKv {
                        key_cache: &m.kc,
                        value_cache: &m.vc,
                        slot_mapping: &slots,
                        block_table: &m.table,
                        cu_seqlens_q: &cu_q,
                        seqlens_k: &m.kv_len,
                        max_seqlen_q: 1,
                        max_seqlen_k: l,
                        prompt_tail: None,
                        continued_chunk: None,
                    };
                    let bytes = (2 * b * l * hkv * hd * 2
                        + 2 * b * hq * hd * 2
                        + 4 * m.table.numel() as i64) as f64;
                    // Baseline: gather the pages, then SDPA.
                    let per = m.table.size()[1];
                    let idx = m.table.to_kind(Kind::Int64).view([-1]);
                    let qb = q.view([b, 1, hq, hd]).transpose(1, 2);
                    let ([ours, cuda_cores, tensor_cores, serial], base) = time_paged(
                        device,
                        reps,
                        (kernel, &input, &pk),
                        20,
                        timed(10, || {
                            let kg =
                                m.kc.index_select(0, &idx)
                                    .view([b, per * bs, hkv, hd])
                                    .narrow(1, 0, l)
                                    .transpose(1, 2);
                            let vg =
                                m.vc.index_select(0, &idx)
                                    .view([b, per * bs, hkv, hd])
                                    .narrow(1, 0, l)
                                    .transpose(1, 2);
                            let _ = run_sdpa(&qb, &kg, &vg, false, hq != hkv);
                            Ok(())
                        }),
                    )?;
                    let gbs = |t: f64| bytes / t / 1e9;
                    report.add(
                        "paged",
                        format!("bs{bs} {hq}/{hkv} {b}x{l} {:.0}% copy", 100.0 * gbs(ours) / copy),
                        ("paged kernel", gbs(ours)),
                        &[
                            ("cuda cores", gbs(cuda_cores)),
                            ("tensor cores", gbs(tensor_cores)),
                            ("serial launch", gbs(serial)),
                            ("gather+sdpa", gbs(base)),
                        ],
                        "GB/s",
                    );
                }
            }
        }
        Ok(())
    }

    fn mixed(device: Device, reps: usize, report: &mut Report) -> Result<()> {
        let (hq, hkv, hd, bs) = (32i64, 8i64, 128i64, 16i64);
        let (nd, ld, lp) = (64i64, 4096i64, 2048i64);
        let kernel = CudaPagedAttention::new(1.0 / (hd as f64).sqrt());
        // 64 decode requests with 4096 cached keys, one request prefilling 2048 new tokens on
        // top of 2048 cached ones (a continued chunk) or of none (a prompt's first chunk: the
        // step's prompt tail, which the automatic path sends to libtorch's kernels).
        for cached in [ld - lp, 0] {
            let m = paged_memory(nd + 1, ld, hkv, hd, bs, device);
            let mut kv = vec![ld as i32; nd as usize];
            kv.push((cached + lp) as i32);
            let kv_len = Tensor::from_slice(&kv).to_device(device);
            let mut cu: Vec<i32> = (0..=nd as i32).collect();
            cu.push(nd as i32 + lp as i32);
            let cu_q = Tensor::from_slice(&cu).to_device(device);
            let t = nd + lp;
            let q = bf16(&[t, 1, hq, hd], device);
            let k = bf16(&[t, 1, hkv, hd], device);
            let v = bf16(&[t, 1, hkv, hd], device);
            let mut slots: Vec<Tensor> = (0..nd).map(|r| m.slots(r, ld - 1, 1)).collect();
            slots.push(m.slots(nd, cached, lp));
            let slots = Tensor::cat(&slots, 0);
            let fresh = cached == 0;
            let run =
                |kernel: CudaPagedAttention,
                 (q, k, v): (&Tensor, &Tensor, &Tensor),
                 (cu, lens, table): (&Tensor, &Tensor, &Tensor),
                 max_q: i64,
                 (prompt_tail, continued_chunk): (Option<PromptTail>, Option<ContinuedChunk>)|
                 -> Result<()> {
                    let input = CoreAttentionInput::new(q, k, v, AttnMaskType::Causal);
                    // The slots of these tokens: the decode rows come first, the prefill chunk last.
                    let n = if q.size()[0] == lp {
                        slots.narrow(0, nd, lp)
                    } else {
                        slots.narrow(0, 0, q.size()[0])
                    };
                    let pk = PagedKv {
                        key_cache: &m.kc,
                        value_cache: &m.vc,
                        slot_mapping: &n,
                        block_table: table,
                        cu_seqlens_q: cu,
                        seqlens_k: lens,
                        max_seqlen_q: max_q,
                        max_seqlen_k: ld,
                        prompt_tail,
                        continued_chunk,
                    };
                    let _ = kernel.run(&input, &pk)?;
                    Ok(())
                };
            let all = (&q, &k, &v);
            let all_meta = (&cu_q, &kv_len, &m.table);
            let tail = fresh.then_some(PromptTail {
                request: nd,
                token: nd,
                head_max_seqlen_q: 1,
                head_max_seqlen_k: ld,
            });
            let chunk = ContinuedChunk {
                request: nd,
                token: nd,
                tokens: lp,
                cached,
                before_max_seqlen_q: 1,
                before_max_seqlen_k: ld,
            };
            let chunk = (!fresh).then_some(chunk);
            let dec_cu = cu_q.narrow(0, 0, nd + 1);
            let dec = (q.narrow(0, 0, nd), k.narrow(0, 0, nd), v.narrow(0, 0, nd));
            let dec_meta = (kv_len.narrow(0, 0, nd), m.table.narrow(0, 0, nd));
            let pre_cu = Tensor::from_slice(&[0i32, lp as i32]).to_device(device);
            let pre = (q.narrow(0, nd, lp), k.narrow(0, nd, lp), v.narrow(0, nd, lp));
            let pre_meta = (kv_len.narrow(0, nd, 1), m.table.narrow(0, nd, 1));
            let pre_tail = fresh.then_some(PromptTail::ALL);
            let pre_chunk = chunk.map(|c| ContinuedChunk {
                request: 0,
                token: 0,
                before_max_seqlen_q: 0,
                before_max_seqlen_k: 0,
                ..c
            });
            let tensor_cores = kernel.with_path(KernelPath::TensorCores);
            let t = time_each(
                device,
                reps,
                &mut [
                    timed(5, || run(kernel, all, all_meta, lp, (tail, chunk))),
                    timed(5, || {
                        let dec_meta = (&dec_cu, &dec_meta.0, &dec_meta.1);
                        run(kernel, (&dec.0, &dec.1, &dec.2), dec_meta, 1, (None, None))?;
                        let pre_meta = (&pre_cu, &pre_meta.0, &pre_meta.1);
                        run(kernel, (&pre.0, &pre.1, &pre.2), pre_meta, lp, (pre_tail, pre_chunk))
                    }),
                    timed(5, || run(tensor_cores, all, all_meta, lp, (tail, chunk))),
                ],
            )?;
            let case = if fresh {
                format!("{nd} decode x{ld} + prompt {lp}")
            } else {
                format!("{nd} decode x{ld} + prefill {lp} on {cached}")
            };
            report.add(
                "mixed",
                case,
                ("one call", t[0] * 1e3),
                &[("two calls", t[1] * 1e3), ("tensor cores", t[2] * 1e3)],
                "ms",
            );
        }
        // Whole prompts prefilled through the paged cache (appending their keys and values)
        // against SDPA's default backend on contiguous memory, causal: `auto` takes libtorch's
        // kernels on the inputs for such steps (`prompt_route_min_tokens`), `tensor cores` is
        // our kernel over the pages.
        for (n, s, hd) in PAGED_PROMPTS {
            let kernel = CudaPagedAttention::new(1.0 / (hd as f64).sqrt());
            let m = paged_memory(n, s, hkv, hd, bs, device);
            let cu = (Tensor::arange(n + 1, (Kind::Int, device)) * s).to_kind(Kind::Int);
            let q = bf16(&[n * s, 1, hq, hd], device);
            let k = bf16(&[n * s, 1, hkv, hd], device);
            let v = bf16(&[n * s, 1, hkv, hd], device);
            let flops = 2.0 * (n * hq * s * s * hd) as f64;
            let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
            let slots: Vec<Tensor> = (0..n).map(|r| m.slots(r, 0, s)).collect();
            let slots = Tensor::cat(&slots, 0);
            let pk = PagedKv {
                key_cache: &m.kc,
                value_cache: &m.vc,
                slot_mapping: &slots,
                block_table: &m.table,
                cu_seqlens_q: &cu,
                seqlens_k: &m.kv_len,
                max_seqlen_q: s,
                max_seqlen_k: s,
                prompt_tail: Some(PromptTail::ALL),
                continued_chunk: None,
            };
            let (qb, kb, vb) =
                (q.view([n, s, hq, hd]), k.view([n, s, hkv, hd]), v.view([n, s, hkv, hd]));
            let (qb, kb, vb) = (qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2));
            let (per_path, sdpa) = time_paged(
                device,
                reps,
                (kernel, &input, &pk),
                5,
                timed(5, || {
                    let _ = run_sdpa(&qb, &kb, &vb, true, true);
                    Ok(())
                }),
            )?;
            let tf = |t: f64| flops / t / 1e12;
            let shape = if n == 1 { format!("s{s}") } else { format!("{n} x s{s}") };
            report.add(
                "prefill",
                format!("paged {hq}/{hkv} hd{hd} {shape} causal"),
                ("paged kernel", tf(per_path[0])),
                &[
                    ("cuda cores", tf(per_path[1])),
                    ("tensor cores", tf(per_path[2])),
                    ("serial launch", tf(per_path[3])),
                    ("sdpa contiguous", tf(sdpa)),
                ],
                "TFLOP/s",
            );
        }
        // A prompt's later chunk alone (new tokens on cached ones, bottom-right causal) through
        // the paged cache: `auto` takes cuDNN over the gathered cached keys and over the chunk's
        // own, merged, from `CHUNK_ROUTE_MIN_FLOP`; `tensor cores` is our kernel over the pages,
        // `routed` the route at any size; the baseline is libtorch's variable-length flash
        // forward (bottom-right causal) on contiguous memory (`sdpa-cuda` on packed sequences).
        for (lp, cached, hd) in PAGED_CHUNKS {
            let kernel = CudaPagedAttention::new(1.0 / (hd as f64).sqrt());
            let lk = cached + lp;
            let m = paged_memory(1, lk, hkv, hd, bs, device);
            let cu = Tensor::from_slice(&[0i32, lp as i32]).to_device(device);
            let q = bf16(&[lp, 1, hq, hd], device);
            let k = bf16(&[lp, 1, hkv, hd], device);
            let v = bf16(&[lp, 1, hkv, hd], device);
            let flops =
                4.0 * (hq * hd) as f64 * (lp * cached) as f64 + 2.0 * (hq * hd * lp * lp) as f64;
            let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
            let slots = m.slots(0, cached, lp);
            let chunk = ContinuedChunk {
                request: 0,
                token: 0,
                tokens: lp,
                cached,
                before_max_seqlen_q: 0,
                before_max_seqlen_k: 0,
            };
            let pk = PagedKv {
                key_cache: &m.kc,
                value_cache: &m.vc,
                slot_mapping: &slots,
                block_table: &m.table,
                cu_seqlens_q: &cu,
                seqlens_k: &m.kv_len,
                max_seqlen_q: lp,
                max_seqlen_k: lk,
                prompt_tail: None,
                continued_chunk: Some(chunk),
            };
            let flash = core("sdpa-cuda", hq, hkv, hd, true)?;
            let (kf, vf) = (bf16(&[lk, 1, hkv, hd], device), bf16(&[lk, 1, hkv, hd], device));
            let packed = PackedSeqParams {
                cu_seqlens_q: cu.shallow_clone(),
                cu_seqlens_kv: Tensor::from_slice(&[0i32, lk as i32]).to_device(device),
                max_seqlen_q: lp,
                max_seqlen_kv: lk,
            };
            let contiguous = CoreAttentionInput {
                packed_seq_params: Some(&packed),
                ..CoreAttentionInput::new(&q, &kf, &vf, AttnMaskType::Causal)
            };
            let tensor_cores = kernel.with_path(KernelPath::TensorCores);
            let routed = kernel.with_route_thresholds(PROMPT_ROUTE_MIN_TOKENS, 0.0);
            let t = time_each(
                device,
                reps,
                &mut [
                    timed(5, || {
                        let _ = kernel.run(&input, &pk)?;
                        Ok(())
                    }),
                    timed(5, || {
                        let _ = tensor_cores.run(&input, &pk)?;
                        Ok(())
                    }),
                    timed(5, || {
                        let _ = routed.run(&input, &pk)?;
                        Ok(())
                    }),
                    timed(5, || {
                        let _ = flash.forward(&contiguous)?;
                        Ok(())
                    }),
                ],
            )?;
            let tf = |t: f64| flops / t / 1e12;
            report.add(
                "prefill",
                format!("paged {hq}/{hkv} hd{hd} chunk {lp} on {cached}"),
                ("paged kernel", tf(t[0])),
                &[("tensor cores", tf(t[1])), ("routed", tf(t[2])), ("flash contiguous", tf(t[3]))],
                "TFLOP/s",
            );
        }
        Ok(())
    }
}
