//! The CUDA paths against the CPU-reference semantics, on the GPU (feature `cuda`):
//!
//! * `flash_decode` (static cache): every decode step equals the ordinary static path and the
//!   full forward (fp32 1e-5; bf16 against the same computation upcast), for MHA/GQA/MQA, Q/K
//!   norms, rotary rotate-half/interleaved/partial, a batch offset, long contexts with split-KV;
//! * `flash_decode` is exact whatever host bound on the offsets sizes its launch;
//! * programmatically launched combines give the same chains of steps as serial ones;
//! * the kernels refuse unsupported input with typed errors;
//! * `sdpa-cuda`: the backend from the spec is the one libtorch runs, outputs equal `sdpa`, and
//!   packed sequences through varlen flash equal per-sequence runs, gradients included.
//!
//! (`paged-attention-cuda` runs the random dynamic schedules of `tests/inference.rs`.)
#![cfg(feature = "cuda")]

use anyhow::{Context, Result, bail};
use attention_core::inference::{FlashDecode, InferenceContext, StaticDecodeStep};
use attention_core::{Attention, AttentionInput, BuiltLayers, RotaryEmbedding, SelfAttention};
use attention_cuda::decode::{CudaFlashDecode, KernelPath};
use attention_inference::StaticInferenceContext;
use attention_spec::module::PackedSeqParams;
use attention_spec::{ForwardError, Model};
use attention_tests::assert_close;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const GPU: Device = Device::Cuda(0);

struct Stack {
    model: Model,
    vs: VarStore,
    layers: BuiltLayers,
}

impl Stack {
    fn new(toml: &str, kind: Kind) -> Result<Self> {
        attention_cuda::link();
        let model = Model::from_toml_str(toml, attention_core::registry()?)?;
        tch::manual_seed(1);
        let mut vs = VarStore::new(GPU);
        let layers = BuiltLayers::build(&vs.root(), &model)?;
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                let fan_in = *t.size().last().unwrap_or(&1) as f64;
                let _ = if t.dim() == 2 {
                    t.normal_(0.0, 1.2 / fan_in.sqrt())
                } else if name.ends_with("weight") {
                    t.normal_(1.0, 0.1)
                } else {
                    t.normal_(0.0, 0.1)
                };
            }
        });
        vs.set_kind(kind);
        Ok(Self { model, vs, layers })
    }

    fn layer(&self, i: usize) -> Result<&SelfAttention> {
        match &self.layers.layers[i].2 {
            Attention::SelfAttention(a) => Ok(a),
            Attention::CrossAttention(_) => bail!("self attention expected"),
        }
    }

    fn rope(&self, len: i64) -> Option<Tensor> {
        let c = &self.model.config;
        (c.position_embedding_type == attention_spec::config::PositionEmbeddingType::Rope)
            .then(|| RotaryEmbedding::from_config(c).forward(len, 0, GPU))
    }

    fn step(
        &self,
        x: &Tensor,
        ctx: &mut dyn InferenceContext,
        rope: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for i in 0..self.layers.layers.len() {
            let mut input = AttentionInput::new(&h);
            if let Some(r) = rope {
                input = input.with_rotary(r);
            }
            let out = self.layer(i)?.forward_with_context(&input, ctx)?;
            h = out.output;
        }
        Ok(h)
    }
}

/// Same parameter values, by name (initialisation order follows a hash map's order).
fn copy_weights(from: &Stack, to: &Stack) -> Result<()> {
    let src = from.vs.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, mut t) in to.vs.variables() {
            t.copy_(src.get(&name).with_context(|| format!("no {name}"))?);
        }
        Ok(())
    })
}

fn config(heads: i64, groups: i64, hn: i64, extra: &str) -> String {
    format!(
        "[transformer]\nnum_layers = 2\nhidden_size = {}\nnum_attention_heads = {heads}\nnum_query_groups = {groups}\n\
         kv_channels = {hn}\nattention_dropout = 0.0\nadd_bias_linear = false\n{extra}\n[attention]\npreset = \"gpt-local\"\n",
        heads * hn
    )
}

/// Prefill with the ordinary path, then decode steps with and without the fused kernel.
fn flash_decode_case(
    label: &str,
    toml: &str,
    kind: Kind,
    decode: impl Into<CudaFlashDecode>,
    (b, b0, p, d): (i64, i64, i64, i64),
    tol: f64,
) -> Result<()> {
    tch::manual_seed(5);
    let stack = Stack::new(toml, kind)?;
    let h = stack.model.config.hidden_size;
    let max = p + d;
    let x = (Tensor::randn([max, b, h], (Kind::Float, GPU)) * 0.5).to_kind(kind);
    let rope = stack.rope(max);
    let mut plain = StaticInferenceContext::new(b0 + b, max)?;
    let mut fused = StaticInferenceContext::new(b0 + b, max)?;
    fused.set_flash_decode(Box::new(decode.into()));
    for ctx in [&mut plain, &mut fused] {
        ctx.batch_size_offset = b0;
        let _ = tch::no_grad(|| stack.step(&x.narrow(0, 0, p), ctx, rope.as_ref()))?;
        ctx.advance(p)?;
    }
    for i in 0..d {
        let xi = x.narrow(0, p + i, 1);
        let a = tch::no_grad(|| stack.step(&xi, &mut plain, rope.as_ref()))?;
        let f = tch::no_grad(|| stack.step(&xi, &mut fused, rope.as_ref()))?;
        plain.advance(1)?;
        fused.advance(1)?;
        assert_close(&f, &a, tol, tol, &format!("{label}: decode step {i}"))?;
    }
    // Both caches hold the same rotated keys.
    let (ka, _) = plain.key_value_memory(1).context("plain cache")?;
    let (kf, _) = fused.key_value_memory(1).context("fused cache")?;
    assert_close(
        &kf.narrow(0, 0, max).narrow(1, b0, b),
        &ka.narrow(0, 0, max).narrow(1, b0, b),
        tol,
        tol,
        &format!("{label}: caches"),
    )?;
    Ok(())
}

#[test]
fn flash_decode_equals_the_static_path() -> Result<()> {
    let rope = "position_embedding_type = \"rope\"";
    // (name, query heads, groups, head dim, extra config)
    let cases = [
        ("mha", 8, 8, 64, ""),
        ("gqa", 8, 2, 128, ""),
        ("mqa_qknorm", 8, 1, 64, "qk_layernorm = true\nnormalization = \"RMSNorm\""),
        ("rope", 8, 2, 128, rope),
        (
            "rope_interleaved_partial",
            4,
            2,
            64,
            "position_embedding_type = \"rope\"\nrotary_interleaved = true\nrotary_percent = 0.5",
        ),
        // Partial rotate-half: 32 rotated pairs (chunks rotated in registers by the decode
        // build), then 12 (not a whole chunk: through shared memory).
        ("rope_partial", 8, 2, 128, "position_embedding_type = \"rope\"\nrotary_percent = 0.5"),
        (
            "rope_partial_uneven",
            8,
            2,
            64,
            "position_embedding_type = \"rope\"\nrotary_percent = 0.375",
        ),
        ("hd32_gqa16", 16, 1, 32, rope),
        ("hd32_gqa", 8, 2, 32, rope),
        ("hd32_mha", 8, 8, 32, rope),
        ("mha_rope", 8, 8, 128, rope),
        ("gqa4_rope", 16, 4, 128, rope),
        ("hd256", 4, 2, 256, rope),
    ];
    let shape = (3, 1, 37, 6);
    for &(name, heads, groups, hn, extra) in &cases {
        let toml = &config(heads, groups, hn, extra);
        let cores = KernelPath::CudaCores;
        flash_decode_case(&format!("{name} f32"), toml, Kind::Float, cores, shape, 1e-5)?;
        flash_decode_case(&format!("{name} bf16"), toml, Kind::BFloat16, cores, shape, 3e-2)?;
        if hn == 256 {
            continue;
        }
        let tensor = CudaFlashDecode::with_path(KernelPath::TensorCores);
        for (kind, label) in [(Kind::BFloat16, "bf16"), (Kind::Half, "f16")] {
            let label = format!("{name} {label} tensor cores");
            flash_decode_case(&label, toml, kind, tensor, shape, 3e-2)?;
            // Blocks of several neighbouring key/value heads, wherever they fit.
            for n in [2, 4] {
                if groups % n == 0 && n * (heads / groups) <= 16 {
                    let label = format!("{label}, {n} heads per block");
                    let forced = tensor.with_heads_per_block(n);
                    flash_decode_case(&label, toml, kind, forced, shape, 3e-2)?;
                }
            }
        }
    }
    // A long context: several splits and their combine.
    let long = config(8, 2, 128, rope);
    let shape = (2, 0, 4100, 3);
    flash_decode_case("long context", &long, Kind::Float, KernelPath::Auto, shape, 1e-5)?;
    let tensor = CudaFlashDecode::with_path(KernelPath::TensorCores);
    flash_decode_case("long context bf16 tc", &long, Kind::BFloat16, tensor, shape, 3e-2)?;
    let long4 = config(16, 4, 128, rope);
    for n in [1, 2, 4] {
        let label = format!("long context bf16 tc, {n} heads per block");
        let forced = tensor.with_heads_per_block(n);
        flash_decode_case(&label, &long4, Kind::BFloat16, forced, shape, 3e-2)?;
    }
    Ok(())
}

#[test]
fn kernels_refuse_unsupported_input() -> Result<()> {
    let stack = Stack::new(&config(4, 2, 48, ""), Kind::Float)?;
    let mut ctx = StaticInferenceContext::new(1, 8)?;
    ctx.set_flash_decode(Box::new(CudaFlashDecode::default()));
    let x = Tensor::randn([2, 1, 4 * 48], (Kind::Float, GPU));
    let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
    ctx.advance(2)?;
    let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 1), &mut ctx, None))
        .err()
        .context("head dim 48 must be refused")?;
    match err.downcast::<ForwardError>() {
        Ok(ForwardError::Unsupported { what, .. }) if what.contains("head dimension 48") => {}
        other => bail!("unexpected {other:?}"),
    }
    let stack = Stack::new(&config(4, 2, 64, ""), Kind::Double)?;
    let mut ctx = StaticInferenceContext::new(1, 8)?;
    ctx.set_flash_decode(Box::new(CudaFlashDecode::default()));
    let x = Tensor::randn([2, 1, 256], (Kind::Double, GPU));
    let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
    ctx.advance(2)?;
    let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 1), &mut ctx, None))
        .err()
        .context("f64 must be refused")?;
    if !err.to_string().contains("dtype") {
        bail!("unexpected {err}");
    }
    // The tensor cores take 16-bit types only.
    let stack = Stack::new(&config(4, 2, 64, ""), Kind::Float)?;
    let mut ctx = StaticInferenceContext::new(1, 8)?;
    ctx.set_flash_decode(Box::new(CudaFlashDecode::with_path(KernelPath::TensorCores)));
    let x = Tensor::randn([2, 1, 256], (Kind::Float, GPU));
    let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
    ctx.advance(2)?;
    let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 1), &mut ctx, None))
        .err()
        .context("fp32 on the tensor cores must be refused")?;
    match err.downcast::<ForwardError>() {
        Ok(ForwardError::Unsupported { what, .. }) if what.contains("tensor-core") => {}
        other => bail!("unexpected {other:?}"),
    }
    // Four key/value heads per block where there are two, and two on the CUDA cores.
    let stack = Stack::new(&config(4, 2, 64, ""), Kind::BFloat16)?;
    let x = Tensor::randn([2, 1, 256], (Kind::BFloat16, GPU));
    let tensor = CudaFlashDecode::with_path(KernelPath::TensorCores);
    for (decode, what) in [
        (tensor.with_heads_per_block(4), "4 key/value heads per block"),
        (tensor.with_heads_per_block(3), "3 key/value heads per block"),
        (
            CudaFlashDecode::with_path(KernelPath::CudaCores).with_heads_per_block(2),
            "2 key/value heads per block",
        ),
    ] {
        let mut ctx = StaticInferenceContext::new(1, 8)?;
        ctx.set_flash_decode(Box::new(decode));
        let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
        ctx.advance(2)?;
        let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 1), &mut ctx, None))
            .err()
            .with_context(|| format!("{what} must be refused"))?;
        match err.downcast::<ForwardError>() {
            Ok(ForwardError::Unsupported { what: w, .. }) if w.contains(what) => {}
            other => bail!("{what}: unexpected {other:?}"),
        }
    }
    // A static cache of 2^21 batch rows x groups per position (512 MiB each cache, never
    // written): the decode build's 32-bit row step would overflow.
    let bf = (Kind::BFloat16, GPU);
    let (kc, vc) =
        (Tensor::empty([1, 1 << 18, 8, 128], bf), Tensor::empty([1, 1 << 18, 8, 128], bf));
    let (q, k, v) = (
        Tensor::zeros([1, 1, 32, 128], bf),
        Tensor::zeros([1, 1, 8, 128], bf),
        Tensor::zeros([1, 1, 8, 128], bf),
    );
    let offsets = Tensor::zeros([1], (Kind::Int, GPU));
    let step = StaticDecodeStep {
        query: &q,
        key: &k,
        value: &v,
        key_cache: &kc,
        value_cache: &vc,
        batch_offset: 0,
        sequence_offsets: &offsets,
        max_sequence_offset: None,
        rotary: None,
        softmax_scale: 0.1,
    };
    match CudaFlashDecode::default().flash_decode(&step) {
        Err(ForwardError::Unsupported { what, .. }) if what.contains("groups per position") => {}
        other => bail!("unexpected {other:?}"),
    }
    Ok(())
}

/// Two layers' decode step with `flash_decode`, captured once in a CUDA graph and replayed for
/// the following tokens (new input written into the captured input, offsets refreshed on the
/// device), equals the same steps run eagerly, and leaves the same cache.
#[test]
fn flash_decode_step_replays_in_a_cuda_graph() -> Result<()> {
    use attention_cuda::graph::CudaGraph;
    tch::manual_seed(5);
    let kind = Kind::BFloat16;
    let stack = Stack::new(&config(8, 2, 128, "position_embedding_type = \"rope\""), kind)?;
    let (b, p, d) = (3, 20, 8);
    let h = stack.model.config.hidden_size;
    let max = p + d;
    let x = (Tensor::randn([max, b, h], (Kind::Float, GPU)) * 0.5).to_kind(kind);
    let rope = stack.rope(max);
    let mut eager = StaticInferenceContext::new(b, max)?;
    let mut graphed = StaticInferenceContext::new(b, max)?;
    for ctx in [&mut eager, &mut graphed] {
        ctx.set_flash_decode(Box::new(CudaFlashDecode::default()));
        let _ = tch::no_grad(|| stack.step(&x.narrow(0, 0, p), ctx, rope.as_ref()))?;
        ctx.advance(p)?;
    }
    // Warm up (kernels loaded, offsets and cos/sin on the device), then capture the step at
    // offset p; both write the same key/value row p, which the replays rewrite.
    let mut input = x.narrow(0, p, 1).copy();
    let _ = tch::no_grad(|| stack.step(&input, &mut graphed, rope.as_ref()))?;
    let (graph, out) =
        CudaGraph::capture(0, || tch::no_grad(|| stack.step(&input, &mut graphed, rope.as_ref())))?;
    for i in 0..d {
        let xi = x.narrow(0, p + i, 1);
        let want = tch::no_grad(|| stack.step(&xi, &mut eager, rope.as_ref()))?;
        eager.advance(1)?;
        tch::no_grad(|| input.copy_(&xi));
        graphed.refresh_decode_offsets(GPU)?;
        graph.replay()?;
        graphed.advance(1)?;
        // The same kernels on the same data; bf16 slack in case cuBLAS picks another algorithm
        // under capture.
        let diff = (&out - &want).abs().max().to_kind(Kind::Float).double_value(&[]);
        println!("replayed decode step {i}: max |graph - eager| {diff:e}");
        assert_close(&out, &want, 2e-2, 2e-2, &format!("replayed decode step {i}"))?;
    }
    for layer in [1, 2] {
        let (ka, va) = eager.key_value_memory(layer).context("eager cache")?;
        let (kg, vg) = graphed.key_value_memory(layer).context("graphed cache")?;
        assert_close(kg, ka, 2e-2, 2e-2, &format!("layer {layer} keys"))?;
        assert_close(vg, va, 2e-2, 2e-2, &format!("layer {layer} values"))?;
    }
    Ok(())
}

/// Bitwise-identical outputs and caches over repeated launches on the same input, for both
/// kernel paths, both caches, every dtype and head dimension: a race between a block's warps
/// (or between blocks) would show as run-to-run differences. It calls nothing but the kernels
/// and tensor copies, so it is also the test to run under compute-sanitizer's racecheck (the
/// model-stack tests run bf16 cuBLAS GEMMs, on which racecheck stops with an internal error).
/// And the two paths agree on the same 16-bit input: the tensor-core path differs from the
/// CUDA-core one (itself exact in fp32 against the full forward) only by rounding the
/// probabilities to the element type for the value product.
#[test]
fn kernel_paths_agree_and_are_deterministic() -> Result<()> {
    tch::manual_seed(11);
    let both = [KernelPath::CudaCores, KernelPath::TensorCores];
    for kind in [Kind::BFloat16, Kind::Half] {
        for hd in [32i64, 64, 128] {
            let per_path = repeated_runs(kind, hd, &both)?;
            let (cc, tc) = (&per_path[0], &per_path[1]);
            let what = format!("{kind:?} hd {hd}");
            assert_close(
                &tc.0,
                &cc.0,
                2e-2,
                2e-2,
                &format!("{what}: paged, tensor vs CUDA cores"),
            )?;
            for (t, c) in tc.1.iter().zip(&cc.1) {
                let heads = t.size()[2] / hd;
                assert_close(
                    t,
                    c,
                    2e-2,
                    2e-2,
                    &format!("{what}: static with {heads} query heads, tensor vs CUDA cores"),
                )?;
            }
        }
    }
    // The CUDA-core builds the tensor cores do not cover: fp32, and head dimension 256.
    for hd in [32, 64, 128, 256] {
        repeated_runs(Kind::Float, hd, &[KernelPath::CudaCores])?;
    }
    for kind in [Kind::BFloat16, Kind::Half] {
        repeated_runs(kind, 256, &[KernelPath::CudaCores])?;
    }
    Ok(())
}

/// Launches per case in `repeated_runs`: 30, or `ATTENTION_TEST_REPEATS` (at least 2; under
/// racecheck, which sees a race in a single run, 2 keep the run to minutes).
fn repeats() -> usize {
    std::env::var("ATTENTION_TEST_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(30).max(2)
}

/// Runs one paged step (a decode, a chunk, a prompt) and two static decode steps `repeats()`
/// times on each of `paths`; every run must equal the first bitwise (outputs and appended cache
/// rows). The static steps have 4 and 48 query heads per key/value head: the one-row-tile
/// build and, past 16 (token, head) pairs a block, the several-row-tile one. Returns each
/// path's paged output and static outputs.
fn repeated_runs(kind: Kind, hd: i64, paths: &[KernelPath]) -> Result<Vec<(Tensor, Vec<Tensor>)>> {
    use attention_core::inference::{RotaryCosSin, StaticDecodeStep};
    use attention_cuda::decode::CudaPagedAttention;
    use attention_spec::AttnMaskType;
    use attention_spec::module::{CoreAttentionInput, PagedKv};
    let (hq, hkv, bs) = (8i64, 2i64, 16i64);
    // Requests: a decode on 3000 cached keys, a 100-token chunk on 500, a 40-token prompt.
    let (cached, new) = ([3000i64, 500, 0], [1i64, 100, 40]);
    let per = 3001 / bs + 1;
    let nb = 3 * per;
    let kc = Tensor::randn([nb, bs, hkv, hd], (kind, GPU));
    let vc = Tensor::randn([nb, bs, hkv, hd], (kind, GPU));
    let table = Tensor::randperm(nb, (Kind::Int64, GPU)).view([3, per]).to_kind(Kind::Int);
    let t: i64 = new.iter().sum();
    let (q, k, v) = (
        Tensor::randn([t, 1, hq, hd], (kind, GPU)),
        Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
        Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
    );
    let cu: Vec<i32> = [0, 1, 101, 141].to_vec();
    let lens: Vec<i32> = (0..3).map(|i| (cached[i] + new[i]) as i32).collect();
    let cu = Tensor::from_slice(&cu).to_device(GPU);
    let lens = Tensor::from_slice(&lens).to_device(GPU);
    let slots = Tensor::zeros([t], (Kind::Int64, GPU));
    // Static caches [max_seq, batch, hkv, hd]: 3 rows decoding at offsets 3000, 17, 700.
    let (max_seq, b) = (3100i64, 3i64);
    let offsets = Tensor::from_slice(&[3000i32, 17, 700]).to_device(GPU);
    let freqs = Tensor::rand([max_seq, hd / 2], (Kind::Float, GPU)) * 100.0;
    let (cos, sin) = (freqs.cos(), freqs.sin());
    let statics: Vec<[Tensor; 5]> = [(hq, hkv), (48, 1)]
        .iter()
        .map(|&(sq, skv)| {
            [
                Tensor::randn([max_seq, b, skv, hd], (kind, GPU)),
                Tensor::randn([max_seq, b, skv, hd], (kind, GPU)),
                Tensor::randn([1, b, sq, hd], (kind, GPU)),
                Tensor::randn([1, b, skv, hd], (kind, GPU)),
                Tensor::randn([1, b, skv, hd], (kind, GPU)),
            ]
        })
        .collect();
    let mut per_path: Vec<(Tensor, Vec<Tensor>)> = Vec::new();
    for &path in paths {
        let kernel = CudaPagedAttention::new(0.125).with_path(path);
        let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
        let (k0, v0) = (kc.copy(), vc.copy());
        let mut first: Option<(Tensor, Tensor, Tensor)> = None;
        for run in 0..repeats() {
            let (kr, vr) = (k0.copy(), v0.copy());
            let pk = PagedKv {
                key_cache: &kr,
                value_cache: &vr,
                slot_mapping: &slots,
                block_table: &table,
                cu_seqlens_q: &cu,
                seqlens_k: &lens,
                max_seqlen_q: 100,
                max_seqlen_k: 3001,
                prompt_tail: None,
                continued_chunk: None,
            };
            let out = kernel.run(&input, &pk)?;
            match &first {
                None => first = Some((out, kr, vr)),
                Some((o, k1, v1)) => {
                    for (name, a, b) in
                        [("output", &out, o), ("keys", &kr, k1), ("values", &vr, v1)]
                    {
                        if !a.equal(b) {
                            bail!(
                                "{kind:?} hd {hd} {path:?} run {run}: paged {name} differ from run 0"
                            );
                        }
                    }
                }
            }
        }
        let paged_out = first.as_ref().map(|f| f.0.shallow_clone()).context("no paged run")?;
        let mut static_outs = Vec::new();
        for [kcs, vcs, qs, ks, vs] in &statics {
            let heads = qs.size()[2];
            let mut first: Option<(Tensor, Tensor)> = None;
            for run in 0..repeats() {
                let kr = kcs.copy();
                let step = StaticDecodeStep {
                    query: qs,
                    key: ks,
                    value: vs,
                    key_cache: &kr,
                    value_cache: vcs,
                    batch_offset: 0,
                    sequence_offsets: &offsets,
                    max_sequence_offset: None,
                    rotary: Some(RotaryCosSin { cos: &cos, sin: &sin, interleaved: false }),
                    softmax_scale: 0.125,
                };
                let out = CudaFlashDecode::with_path(path).run(&step)?;
                match &first {
                    None => first = Some((out, kr)),
                    Some((o, k1)) => {
                        if !out.equal(o) || !kr.equal(k1) {
                            bail!(
                                "{kind:?} hd {hd} {path:?} {heads} heads run {run}: static output or keys differ from run 0"
                            );
                        }
                    }
                }
            }
            static_outs.push(first.map(|f| f.0).context("no static run")?);
        }
        per_path.push((paged_out, static_outs));
    }
    Ok(per_path)
}

/// `max_seqlen_k` sizes the paged launch (its split-KV); one smaller than a request's keys
/// (a caller's mistake) costs speed, never keys: the kernel spreads a longer row over all the
/// launch's splits. Same outputs as with the true value, on both kernel paths.
#[test]
fn paged_kernel_stays_exact_with_an_understated_max_seqlen_k() -> Result<()> {
    use attention_cuda::decode::CudaPagedAttention;
    use attention_spec::AttnMaskType;
    use attention_spec::module::{CoreAttentionInput, PagedKv};
    tch::manual_seed(13);
    let (hq, hkv, hd, bs) = (8i64, 2i64, 128i64, 16i64);
    // A decode on 5000 cached keys and a 40-token chunk on 300.
    let (cached, new) = ([5000i64, 300], [1i64, 40]);
    let per = 5001 / bs + 1;
    for (kind, path, tol) in [
        (Kind::Float, KernelPath::CudaCores, 1e-5),
        (Kind::BFloat16, KernelPath::TensorCores, 2e-2),
    ] {
        let nb = 2 * per;
        let kc = Tensor::randn([nb, bs, hkv, hd], (kind, GPU));
        let vc = Tensor::randn([nb, bs, hkv, hd], (kind, GPU));
        let table = Tensor::randperm(nb, (Kind::Int64, GPU)).view([2, per]).to_kind(Kind::Int);
        let t = new[0] + new[1];
        let (q, k, v) = (
            Tensor::randn([t, 1, hq, hd], (kind, GPU)),
            Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
            Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
        );
        let cu = Tensor::from_slice(&[0i32, 1, 41]).to_device(GPU);
        let lens: Vec<i32> = (0..2).map(|r| (cached[r] + new[r]) as i32).collect();
        let lens = Tensor::from_slice(&lens).to_device(GPU);
        let slots = Tensor::zeros([t], (Kind::Int64, GPU));
        let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
        let kernel = CudaPagedAttention::new(0.125).with_path(path);
        let run = |max_k: i64| {
            let (kr, vr) = (kc.copy(), vc.copy());
            let pk = PagedKv {
                key_cache: &kr,
                value_cache: &vr,
                slot_mapping: &slots,
                block_table: &table,
                cu_seqlens_q: &cu,
                seqlens_k: &lens,
                max_seqlen_q: 40,
                max_seqlen_k: max_k,
                prompt_tail: None,
                continued_chunk: None,
            };
            kernel.run(&input, &pk)
        };
        let exact = run(5001)?;
        for understated in [1000, 64] {
            let out = run(understated)?;
            let what = format!("{kind:?} {path:?}, max_seqlen_k {understated} of 5001");
            assert_close(&out, &exact, tol, tol, &what)?;
        }
    }
    Ok(())
}

/// The paged kernels against attention computed in fp32 by libtorch, for block sizes whose
/// key tiles sit on one page (64, 256: rows evenly strided), span pages (16) or either (96):
/// a decode on 1000 cached keys and a 70-token chunk on 300 (bottom-right causal), pages in a
/// shuffled order. The appended keys and values land in their slots.
#[test]
fn paged_kernel_is_exact_for_any_block_size() -> Result<()> {
    use attention_cuda::decode::CudaPagedAttention;
    use attention_spec::AttnMaskType;
    use attention_spec::module::{CoreAttentionInput, PagedKv};
    tch::manual_seed(19);
    let (hq, hkv, hd) = (8i64, 2i64, 128i64);
    let (cached, new) = ([1000i64, 300], [1i64, 70]);
    let t = new[0] + new[1];
    for bs in [16i64, 64, 96, 256] {
        for (kind, path, tol) in [
            (Kind::Float, KernelPath::CudaCores, 1e-5),
            (Kind::BFloat16, KernelPath::TensorCores, 2e-2),
        ] {
            let per = (cached[0] + new[0] + bs - 1) / bs;
            let nb = 2 * per;
            let table = Tensor::randperm(nb, (Kind::Int64, Device::Cpu)).view([2, per]);
            // Each request's keys and values in order, then scattered into its pages.
            let keys: Vec<Tensor> =
                cached.iter().map(|&c| Tensor::randn([c, hkv, hd], (kind, GPU))).collect();
            let vals: Vec<Tensor> =
                cached.iter().map(|&c| Tensor::randn([c, hkv, hd], (kind, GPU))).collect();
            let slots_of = |r: usize, from: i64, n: i64| -> Vec<i64> {
                (from..from + n)
                    .map(|p| table.int64_value(&[r as i64, p / bs]) * bs + p % bs)
                    .collect()
            };
            let mut kc = Tensor::randn([nb * bs, hkv, hd], (kind, GPU));
            let mut vc = Tensor::randn([nb * bs, hkv, hd], (kind, GPU));
            for r in 0..2 {
                let slots = Tensor::from_slice(&slots_of(r, 0, cached[r])).to_device(GPU);
                let _ = kc.index_copy_(0, &slots, &keys[r]);
                let _ = vc.index_copy_(0, &slots, &vals[r]);
            }
            let (kc, vc) = (kc.view([nb, bs, hkv, hd]), vc.view([nb, bs, hkv, hd]));
            let (q, k, v) = (
                Tensor::randn([t, 1, hq, hd], (kind, GPU)),
                Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
                Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
            );
            let cu = Tensor::from_slice(&[0i32, 1, 71]).to_device(GPU);
            let lens: Vec<i32> = (0..2).map(|r| (cached[r] + new[r]) as i32).collect();
            let lens = Tensor::from_slice(&lens).to_device(GPU);
            let table = table.to_kind(Kind::Int).to_device(GPU);
            let slots = Tensor::zeros([t], (Kind::Int64, GPU));
            let pk = PagedKv {
                key_cache: &kc,
                value_cache: &vc,
                slot_mapping: &slots,
                block_table: &table,
                cu_seqlens_q: &cu,
                seqlens_k: &lens,
                max_seqlen_q: 70,
                max_seqlen_k: 1001,
                prompt_tail: None,
                continued_chunk: None,
            };
            let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
            let out = CudaPagedAttention::new(0.125).with_path(path).run(&input, &pk)?;
            let what = format!("{kind:?} {path:?}, block size {bs}");
            let mut first = 0;
            for r in 0..2 {
                let (c, n) = (cached[r], new[r]);
                let g = hq / hkv;
                let all_k = Tensor::cat(&[&keys[r], &k.narrow(0, first, n).squeeze_dim(1)], 0);
                let all_v = Tensor::cat(&[&vals[r], &v.narrow(0, first, n).squeeze_dim(1)], 0);
                let all_k = all_k.to_kind(Kind::Float).repeat_interleave_self_int(g, 1, None);
                let all_v = all_v.to_kind(Kind::Float).repeat_interleave_self_int(g, 1, None);
                let qr = q.narrow(0, first, n).squeeze_dim(1).to_kind(Kind::Float); // [n, hq, hd]
                let scores = qr.transpose(0, 1).matmul(&all_k.permute([1, 2, 0])) * 0.125; // [hq, n, c+n]
                // Query j sees keys 0..=c + j.
                let pos = Tensor::arange(c + n, (Kind::Int64, GPU)).view([1, c + n]);
                let last = Tensor::arange(n, (Kind::Int64, GPU)).view([n, 1]) + c;
                let scores = scores.masked_fill(&pos.gt_tensor(&last), f64::NEG_INFINITY);
                let att = scores.softmax(-1, Kind::Float).matmul(&all_v.transpose(0, 1)); // [hq, n, hd]
                let reference = att.transpose(0, 1).reshape([n, 1, hq * hd]);
                let got = out.narrow(0, first, n).to_kind(Kind::Float);
                assert_close(&got, &reference, tol, tol, &format!("{what}, request {r}"))?;
                // The new keys and values were appended at their positions.
                let new_slots = Tensor::from_slice(&slots_of(r, c, n)).to_device(GPU);
                let flat = |x: &Tensor| x.view([nb * bs, hkv, hd]).index_select(0, &new_slots);
                if !flat(&kc).equal(&k.narrow(0, first, n).squeeze_dim(1))
                    || !flat(&vc).equal(&v.narrow(0, first, n).squeeze_dim(1))
                {
                    bail!("{what}, request {r}: the new keys or values are not in their slots");
                }
                first += n;
            }
        }
    }
    Ok(())
}

/// A step's trailing prompts without cached keys (`PagedKv::prompt_tail`) on the automatic
/// path are attended by libtorch's kernels on the inputs from `prompt_route_min_tokens` tokens
/// (SDPA for one prompt, the variable-length flash forward for several, an empty one included)
/// and appended by ours, and so is a prompt's later chunk before them
/// (`PagedKv::continued_chunk`: cuDNN over its gathered cached keys and over its own, merged),
/// while the requests before those (decode tokens, a short continued chunk) run our kernel;
/// shorter tails and chunks stay on our kernel, after a routed chunk too. Outputs match
/// attention in fp32 (bottom-right causal over cached and new keys) and the tensor-core kernel
/// over the whole step (the same bits where nothing is routed), and the caches equal that
/// kernel's, bit for bit, for a block size of 16 and one of 96 (not a power of two). A routed
/// step captured into a CUDA graph replays as that kernel's step (bit for bit, caches too); a
/// step whose routes fail (injected) is our kernel's over those requests, counted. A tail
/// outside the step and a chunk that is not the request before the tail are refused.
#[test]
fn paged_prompt_tails_match_the_kernel() -> Result<()> {
    use attention_cuda::decode::{
        CudaPagedAttention, PROMPT_ROUTE_MIN_TOKENS, chunk_flop, inject_route_failures,
        prompt_route_min_tokens, route_fallbacks,
    };
    use attention_cuda::graph::CudaGraph;
    use attention_spec::AttnMaskType;
    use attention_spec::module::{ContinuedChunk, CoreAttentionInput, PagedKv, PromptTail};
    tch::manual_seed(23);
    let (hq, hkv) = (8i64, 2i64);
    // Requests (cached keys, new tokens): a head with cached keys, then fresh prompts.
    let head = [(700i64, 1i64), (40, 1), (300, 70)];
    // Tails over the route's threshold at head dimension 128 only (1024 to 2047 tokens), over it
    // at both 128 and 64 (2100), and under both (500).
    let tails: [&[i64]; 5] = [&[1100], &[2100], &[600, 300, 200], &[500, 0, 400, 150], &[300, 200]];
    // Continued chunks (cached keys, new tokens) before the tails, routed here from 6 GFLOP
    // (8 query heads): at head dimension 128 only, at both (3000, 2100 and 800, 2100), at
    // neither (50, 600).
    let chunk_min = 6e9;
    // A step: its head (cached keys, new tokens), its continued chunk, its prompts.
    type Step<'a> = (&'a [(i64, i64)], Option<(i64, i64)>, &'a [i64]);
    let steps = tails.iter().map(|&tail| (&[][..], None, tail)).chain([
        (&head[..], None, &[1100][..]),
        (&head, None, &[600, 0, 500]),
        (&head, None, &[200]),
        (&[], Some((1500, 1100)), &[]),
        (&head, Some((3000, 2100)), &[]),
        (&head, Some((800, 2100)), &[1100]),
        (&head[..2], Some((2000, 1100)), &[300]),
        (&[], Some((50, 600)), &[200]),
    ]);
    let steps: Vec<Step<'_>> = steps.collect();
    for (kind, hd) in [(Kind::BFloat16, 128i64), (Kind::Half, 64)] {
        for bs in [16i64, 96] {
            for &(head, chunk, prompts) in &steps {
                let reqs: Vec<(i64, i64)> = head
                    .iter()
                    .copied()
                    .chain(chunk)
                    .chain(prompts.iter().map(|&l| (0, l)))
                    .collect();
                let n = reqs.len() as i64;
                let t: i64 = reqs.iter().map(|r| r.1).sum();
                let before: i64 = head.iter().map(|r| r.1).sum();
                let t0 = before + chunk.map_or(0, |c| c.1);
                let per = reqs.iter().map(|&(c, l)| (c + l + bs - 1) / bs).max().unwrap_or(1);
                let nb = n * per + 3;
                let table = Tensor::randperm(nb, (Kind::Int64, Device::Cpu)).narrow(0, 0, n * per);
                let table = table.view([n, per]);
                let slot = |r: usize, p: i64| table.int64_value(&[r as i64, p / bs]) * bs + p % bs;
                let mut kc = Tensor::randn([nb * bs, hkv, hd], (kind, GPU));
                let mut vc = Tensor::randn([nb * bs, hkv, hd], (kind, GPU));
                // Each request's cached keys and values, scattered into its pages.
                let mut cached_kv = Vec::new();
                for (r, &(c, _)) in reqs.iter().enumerate() {
                    let (kr, vr) = (
                        Tensor::randn([c, hkv, hd], (kind, GPU)),
                        Tensor::randn([c, hkv, hd], (kind, GPU)),
                    );
                    let slots: Vec<i64> = (0..c).map(|p| slot(r, p)).collect();
                    let slots = Tensor::from_slice(&slots).to_device(GPU);
                    let _ = kc.index_copy_(0, &slots, &kr);
                    let _ = vc.index_copy_(0, &slots, &vr);
                    cached_kv.push((kr, vr));
                }
                let (kc0, vc0) = (kc.view([nb, bs, hkv, hd]), vc.view([nb, bs, hkv, hd]));
                let mut new_slots = Vec::new();
                let mut cu = vec![0i32];
                for (r, &(c, l)) in reqs.iter().enumerate() {
                    new_slots.extend((c..c + l).map(|p| slot(r, p)));
                    cu.push(cu[r] + l as i32);
                }
                let new_slots = Tensor::from_slice(&new_slots).to_device(GPU);
                let cu = Tensor::from_slice(&cu).to_device(GPU);
                let seqlens: Vec<i32> = reqs.iter().map(|&(c, l)| (c + l) as i32).collect();
                let seqlens = Tensor::from_slice(&seqlens).to_device(GPU);
                let table = table.to_kind(Kind::Int).to_device(GPU);
                let (q, k, v) = (
                    Tensor::randn([t, 1, hq, hd], (kind, GPU)),
                    Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
                    Tensor::randn([t, 1, hkv, hd], (kind, GPU)),
                );
                let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
                let longest = |v: &mut dyn Iterator<Item = i64>| v.max().unwrap_or(0);
                let r0 = (head.len() + usize::from(chunk.is_some())) as i64;
                let tail = PromptTail {
                    request: r0,
                    token: t0,
                    head_max_seqlen_q: longest(&mut reqs[..r0 as usize].iter().map(|r| r.1)),
                    head_max_seqlen_k: longest(&mut reqs[..r0 as usize].iter().map(|r| r.0 + r.1)),
                };
                let tail = (!prompts.is_empty()).then_some(tail);
                let chunk = chunk.map(|(cached, tokens)| ContinuedChunk {
                    request: head.len() as i64,
                    token: before,
                    tokens,
                    cached,
                    before_max_seqlen_q: longest(&mut head.iter().map(|r| r.1)),
                    before_max_seqlen_k: longest(&mut head.iter().map(|r| r.0 + r.1)),
                });
                let run = |path: KernelPath, tail: Option<PromptTail>, chunk| {
                    let (kc, vc) = (kc0.copy(), vc0.copy());
                    let pk = PagedKv {
                        key_cache: &kc,
                        value_cache: &vc,
                        slot_mapping: &new_slots,
                        block_table: &table,
                        cu_seqlens_q: &cu,
                        seqlens_k: &seqlens,
                        max_seqlen_q: longest(&mut reqs.iter().map(|r| r.1)),
                        max_seqlen_k: longest(&mut reqs.iter().map(|r| r.0 + r.1)),
                        prompt_tail: tail,
                        continued_chunk: chunk,
                    };
                    let kernel = CudaPagedAttention::new(0.125)
                        .with_route_thresholds(PROMPT_ROUTE_MIN_TOKENS, chunk_min);
                    let out = kernel.with_path(path).run(&input, &pk);
                    out.map(|o| (o, kc, vc))
                };
                let what = format!(
                    "{kind:?} hd {hd}, block size {bs}, head {head:?}, chunk {chunk:?}, prompts \
                     {prompts:?}"
                );
                let (routed, kr, vr) = run(KernelPath::Auto, tail, chunk)?;
                let (kernel, kk, vk) = run(KernelPath::TensorCores, tail, chunk)?;
                if !kr.equal(&kk) || !vr.equal(&vk) {
                    bail!("{what}: the routed step's caches differ from the kernel's");
                }
                let flat = |x: &Tensor| x.view([nb * bs, hkv, hd]).index_select(0, &new_slots);
                if !flat(&kr).equal(&k.squeeze_dim(1)) || !flat(&vr).equal(&v.squeeze_dim(1)) {
                    bail!("{what}: the new keys or values are not in their slots");
                }
                assert_close(&routed, &kernel, 2e-2, 2e-2, &format!("{what}: routed vs kernel"))?;
                // Long tails and chunks took libtorch's kernels (other bits); with neither, the
                // step ran our kernel alone (the same bits).
                let tail_routed = !prompts.is_empty() && t - t0 >= prompt_route_min_tokens(hd);
                let chunk_routed = chunk.is_some_and(|c| chunk_flop(&c, hq, hd) >= chunk_min);
                let same = |from: i64, len: i64| {
                    routed.narrow(0, from, len).equal(&kernel.narrow(0, from, len))
                };
                if (tail_routed && same(t0, t - t0))
                    || chunk.is_some_and(|c| chunk_routed && same(c.token, c.tokens))
                    || (!tail_routed && !chunk_routed && !routed.equal(&kernel))
                {
                    bail!("{what}: the automatic path's kernels are not the ones lengths pick");
                }
                // Routes whose libtorch work fails leave their requests to our kernel in the same
                // call (failures injected into every route, then, where both are taken, into the
                // chunk's alone): the kernel's caches and, within tolerance, its output.
                let routes = u32::from(tail_routed) + u32::from(chunk_routed);
                for failures in (1..=routes).rev() {
                    let fallbacks = route_fallbacks();
                    inject_route_failures(failures);
                    let fell = run(KernelPath::Auto, tail, chunk);
                    inject_route_failures(0);
                    let (fell, kf, vf) = fell?;
                    let counted = route_fallbacks() - fallbacks;
                    if counted != u64::from(failures) {
                        bail!("{what}: {failures} failed routes, {counted} fallbacks counted");
                    }
                    if !kf.equal(&kk) || !vf.equal(&vk) {
                        bail!(
                            "{what}: {failures} failed routes: the caches differ from the kernel's"
                        );
                    }
                    let context = format!("{what}: {failures} failed routes vs kernel");
                    assert_close(&fell, &kernel, 2e-2, 2e-2, &context)?;
                }
                if tail_routed || chunk_routed {
                    // Captured into a CUDA graph, the automatic path takes our kernel over the
                    // whole step: a replay gives its bits and caches.
                    let (graph, (captured, kc, vc)) =
                        CudaGraph::capture(0, || run(KernelPath::Auto, tail, chunk))?;
                    graph.replay()?;
                    if !captured.equal(&kernel) || !kc.equal(&kk) || !vc.equal(&vk) {
                        bail!("{what}: the replay of a captured step is not our kernel's step");
                    }
                }
                let mut first = 0;
                for (r, &(c, l)) in reqs.iter().enumerate() {
                    if l == 0 {
                        continue;
                    }
                    let g = hq / hkv;
                    let new_part =
                        |x: &Tensor, heads: i64| x.narrow(0, first, l).view([l, heads, hd]);
                    let keys = Tensor::cat(&[&cached_kv[r].0, &new_part(&k, hkv)], 0);
                    let values = Tensor::cat(&[&cached_kv[r].1, &new_part(&v, hkv)], 0);
                    let heads_first = |x: Tensor| {
                        x.to_kind(Kind::Float)
                            .transpose(0, 1)
                            .repeat_interleave_self_int(g, 0, None)
                    };
                    let (kr, vr) = (heads_first(keys), heads_first(values));
                    let qr = new_part(&q, hq).to_kind(Kind::Float).transpose(0, 1);
                    // Query j sees keys 0..=c + j.
                    let mask = Tensor::ones([l, c + l], (Kind::Bool, GPU)).triu(c + 1);
                    let scores = qr.matmul(&kr.transpose(1, 2)) * 0.125;
                    let att = scores.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Float);
                    let reference = att.matmul(&vr).transpose(0, 1).reshape([l, 1, hq * hd]);
                    let got = routed.narrow(0, first, l).to_kind(Kind::Float);
                    assert_close(&got, &reference, 2e-2, 2e-2, &format!("{what}: request {r}"))?;
                    first += l;
                }
                // A tail past the step, or a chunk after the tail's first request, is refused
                // (before any write).
                let past = PromptTail { request: n + 1, ..tail.unwrap_or(PromptTail::ALL) };
                if run(KernelPath::Auto, Some(past), chunk).is_ok() {
                    bail!("{what}: a prompt tail at request {} was accepted", n + 1);
                }
                if let Some(c) = chunk {
                    let late = ContinuedChunk { request: c.request + 1, ..c };
                    if run(KernelPath::Auto, tail, Some(late)).is_ok() {
                        bail!(
                            "{what}: a continued chunk at request {} was accepted",
                            c.request + 1
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// `max_sequence_offset` sizes the static launch: with the cache's length (`None`), the true
/// bound, or one below some rows' offsets (their keys spread over the launch's splits), the
/// output equals attention over each row's cached keys plus its new one (libtorch, fp32), and
/// the appended cache is the same. A bound outside the cache is refused.
#[test]
fn flash_decode_is_exact_whatever_its_offset_bound() -> Result<()> {
    use attention_core::inference::StaticDecodeStep;
    tch::manual_seed(17);
    let (hq, hkv, hd, max_seq) = (16i64, 4i64, 128i64, 8192i64);
    let offsets = [5000i64, 300, 2047];
    let b = offsets.len() as i64;
    let offs: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
    let offs = Tensor::from_slice(&offs).to_device(GPU);
    let tensor = CudaFlashDecode::with_path(KernelPath::TensorCores);
    for (kind, decode, tol) in [
        (Kind::Float, KernelPath::CudaCores.into(), 1e-5),
        (Kind::BFloat16, tensor, 2e-2),
        (Kind::BFloat16, tensor.with_heads_per_block(2), 2e-2),
        (Kind::BFloat16, tensor.with_heads_per_block(4), 2e-2),
    ] {
        let kc = Tensor::randn([max_seq, b, hkv, hd], (kind, GPU));
        let vc = Tensor::randn([max_seq, b, hkv, hd], (kind, GPU));
        let q = Tensor::randn([1, b, hq, hd], (kind, GPU));
        let k = Tensor::randn([1, b, hkv, hd], (kind, GPU));
        let v = Tensor::randn([1, b, hkv, hd], (kind, GPU));
        let run = |bound: Option<i64>| -> Result<(Tensor, Tensor, Tensor), attention_cuda::Error> {
            let (kr, vr) = (kc.copy(), vc.copy());
            let step = StaticDecodeStep {
                query: &q,
                key: &k,
                value: &v,
                key_cache: &kr,
                value_cache: &vr,
                batch_offset: 0,
                sequence_offsets: &offs,
                max_sequence_offset: bound,
                rotary: None,
                softmax_scale: 0.125,
            };
            let out = decode.run(&step)?;
            Ok((out, kr, vr))
        };
        // Each row's keys 0..=offset (the new key last), in fp32.
        let mut rows = Vec::new();
        for (r, &o) in offsets.iter().enumerate() {
            let r = r as i64;
            let keys = Tensor::cat(&[kc.narrow(0, 0, o).select(1, r), k.select(1, r)], 0);
            let vals = Tensor::cat(&[vc.narrow(0, 0, o).select(1, r), v.select(1, r)], 0);
            let g = hq / hkv;
            let keys = keys.to_kind(Kind::Float).repeat_interleave_self_int(g, 1, None);
            let vals = vals.to_kind(Kind::Float).repeat_interleave_self_int(g, 1, None);
            let qr = q.select(1, r).to_kind(Kind::Float).squeeze_dim(0); // [hq, hd]
            let scores = qr.unsqueeze(1).matmul(&keys.permute([1, 2, 0])) * 0.125; // [hq, 1, o+1]
            let att = scores.softmax(-1, Kind::Float).matmul(&vals.transpose(0, 1)); // [hq, 1, hd]
            rows.push(att.reshape([1, 1, hq * hd]));
        }
        let reference = Tensor::cat(&rows, 1);
        let (_, k0, v0) = run(None)?;
        for bound in [None, Some(5000), Some(1000), Some(0)] {
            let (out, kr, vr) = run(bound)?;
            let what = format!("{kind:?} {decode:?}, max_sequence_offset {bound:?} of 5000");
            assert_close(&out.to_kind(Kind::Float), &reference, tol, tol, &what)?;
            if !kr.equal(&k0) || !vr.equal(&v0) {
                bail!("{what}: the appended cache differs from the unbounded run");
            }
        }
        for bad in [-1, max_seq] {
            match run(Some(bad)) {
                Err(e) if e.to_string().contains("max_sequence_offset") => {}
                other => bail!("max_sequence_offset {bad}: expected a refusal, got {other:?}"),
            }
        }
    }
    Ok(())
}

/// Programmatic dependent launch (the default) lets the split combine be scheduled while the
/// attention kernel finishes; it waits for it before touching memory. Chains of steps whose
/// query, key and value are the previous step's output (MHA: the output has their shape) and
/// whose new keys and values overwrite the slots the previous step wrote give the same outputs
/// and caches, bit for bit, as the same chains launched one kernel after the other: static
/// decode with and without split-KV (whose combine kernel follows the attention kernel), and
/// the paged kernel with it.
#[test]
fn programmatic_launches_equal_serial_ones() -> Result<()> {
    use attention_core::inference::StaticDecodeStep;
    use attention_cuda::decode::CudaPagedAttention;
    use attention_spec::AttnMaskType;
    use attention_spec::module::{CoreAttentionInput, PagedKv};
    tch::manual_seed(23);
    let (h, hd, steps) = (8i64, 128i64, 12);
    let kind = Kind::BFloat16;
    // One long row (split-KV and the combine) and 64 short ones (no split).
    for (b, max_seq, offset) in [(1i64, 16384i64, 16000i32), (64, 1024, 700)] {
        let kc = Tensor::randn([max_seq, b, h, hd], (kind, GPU));
        let vc = Tensor::randn([max_seq, b, h, hd], (kind, GPU));
        let x0 = Tensor::randn([1, b, h, hd], (kind, GPU));
        let offsets = Tensor::full([b], i64::from(offset), (Kind::Int, GPU));
        let chain = |programmatic: bool| -> Result<(Tensor, Tensor, Tensor)> {
            let (kr, vr) = (kc.copy(), vc.copy());
            let mut x = x0.copy();
            for _ in 0..steps {
                let step = StaticDecodeStep {
                    query: &x,
                    key: &x,
                    value: &x,
                    key_cache: &kr,
                    value_cache: &vr,
                    batch_offset: 0,
                    sequence_offsets: &offsets,
                    max_sequence_offset: Some(i64::from(offset)),
                    rotary: None,
                    softmax_scale: 0.125,
                };
                let decode = CudaFlashDecode::default().with_programmatic_launch(programmatic);
                x = decode.run(&step)?.view([1, b, h, hd]);
            }
            Ok((x, kr, vr))
        };
        let what = format!("static decode, {b} rows at offset {offset}");
        same_chain_results(&what, &chain(false)?, &chain(true)?)?;
    }
    // Paged: 4 decode requests of 6000 keys in 16-token pages (split-KV).
    let (n, len, bs) = (4i64, 6000i64, 16i64);
    let per = (len + bs - 1) / bs;
    let kc = Tensor::randn([n * per, bs, h, hd], (kind, GPU));
    let vc = Tensor::randn([n * per, bs, h, hd], (kind, GPU));
    let table = Tensor::randperm(n * per, (Kind::Int, GPU)).view([n, per]);
    let cu = Tensor::arange(n + 1, (Kind::Int, GPU));
    let lens = Tensor::full([n], len, (Kind::Int, GPU));
    let slots = Tensor::zeros([n], (Kind::Int64, GPU));
    let x0 = Tensor::randn([n, 1, h, hd], (kind, GPU));
    let chain = |programmatic: bool| -> Result<(Tensor, Tensor, Tensor)> {
        let (kr, vr) = (kc.copy(), vc.copy());
        let kernel = CudaPagedAttention::new(0.125).with_programmatic_launch(programmatic);
        let mut x = x0.copy();
        for _ in 0..steps {
            let pk = PagedKv {
                key_cache: &kr,
                value_cache: &vr,
                slot_mapping: &slots,
                block_table: &table,
                cu_seqlens_q: &cu,
                seqlens_k: &lens,
                max_seqlen_q: 1,
                max_seqlen_k: len,
                prompt_tail: None,
                continued_chunk: None,
            };
            let input = CoreAttentionInput::new(&x, &x, &x, AttnMaskType::Causal);
            x = kernel.run(&input, &pk)?.view([n, 1, h, hd]);
        }
        Ok((x, kr, vr))
    };
    same_chain_results("paged decode", &chain(false)?, &chain(true)?)
}

/// Output, keys and values of a serially launched chain and of a programmatic one, bit for bit.
fn same_chain_results(
    what: &str,
    serial: &(Tensor, Tensor, Tensor),
    programmatic: &(Tensor, Tensor, Tensor),
) -> Result<()> {
    for (name, a, b) in [
        ("output", &programmatic.0, &serial.0),
        ("keys", &programmatic.1, &serial.1),
        ("values", &programmatic.2, &serial.2),
    ] {
        if !a.equal(b) {
            bail!("{what}: {name} differ from serial launches");
        }
    }
    Ok(())
}

/// The attention kernels compile for this GPU without register spills, and the tensor-core
/// kernels keep at least two blocks per multiprocessor (three for the decode build); the
/// head-dimension-128 build of several row tiles keeps three for a few spilled values (at most
/// 112 bytes of stack: `ATTN_MMA_BOUNDS_128` in the kernels, `allowed_spill` in tests/ptx.rs).
#[test]
fn kernels_fit_in_registers() -> Result<()> {
    use attention_cuda::runtime::{Tile, Variant, kernels};
    for (dtype, head_dim, tile, smem) in [
        ("bf16", 128, Tile::TensorCores { rows: 64 }, 73 * 1024),
        ("bf16", 128, Tile::TensorCores { rows: 16 }, 73 * 1024),
        ("bf16", 64, Tile::TensorCores { rows: 64 }, 40 * 1024),
        ("bf16", 128, Tile::CudaCores { pairs: 8 }, 40 * 1024),
        ("f32", 256, Tile::CudaCores { pairs: 8 }, 80 * 1024),
    ] {
        let v = Variant { dtype, head_dim, tile };
        let k = kernels(0, v)?;
        for paged in [false, true] {
            let name = v.attend_name(paged);
            let f = k.function(&name, 128, smem)?;
            println!("{name}: {} registers, {} resident blocks", f.registers, f.resident);
            let (want, local) = match (tile, head_dim) {
                (Tile::TensorCores { rows: 16 }, _) => (3, 0),
                (Tile::TensorCores { .. }, 128) => (3, 112),
                (Tile::TensorCores { .. }, _) => (2, 0),
                (Tile::CudaCores { .. }, _) => (1, 0),
            };
            if f.local_bytes > local {
                bail!("{name} spills {} bytes per thread to local memory", f.local_bytes);
            }
            if f.resident < want {
                bail!("{name}: only {} resident blocks", f.resident);
            }
        }
    }
    Ok(())
}

fn sdpa_cuda(backend: &str, extra: &str) -> String {
    format!(
        "[transformer]\nhidden_size = 256\nnum_attention_heads = 8\nnum_query_groups = 2\nkv_channels = 64\n\
         attention_dropout = 0.0\nparams_dtype = \"bfloat16\"\nbf16 = true\n{extra}\n[attention]\npreset = \"gpt-local\"\n\
         submodules = {{ core_attention = {{ module = \"sdpa-cuda\", params = {{ backend = \"{backend}\" }} }} }}\n"
    )
}

#[test]
fn sdpa_cuda_backends_and_varlen() -> Result<()> {
    let reference = Stack::new(
        &sdpa_cuda("auto", "")
            .replace("{ module = \"sdpa-cuda\", params = { backend = \"auto\" } }", "\"sdpa\""),
        Kind::BFloat16,
    )?;
    let x = (Tensor::randn([128, 2, 256], (Kind::Float, GPU)) * 0.5).to_kind(Kind::BFloat16);
    let want = tch::no_grad(|| {
        reference
            .layer(0)?
            .forward(&AttentionInput::new(&x))
            .map(|o| o.output)
            .map_err(anyhow::Error::from)
    })?;
    // Gradients of the input through the whole layer, for a weighting `w` of the output.
    let w = Tensor::randn([128, 2, 256], (Kind::Float, GPU)).to_kind(Kind::BFloat16);
    let input_grad = |s: &Stack| -> Result<Tensor> {
        let xg = x.detach().set_requires_grad(true);
        let out = s.layer(0)?.forward(&AttentionInput::new(&xg))?;
        (out.output * &w).to_kind(Kind::Float).sum(Kind::Float).backward();
        Ok(xg.grad())
    };
    let want_grad = input_grad(&reference)?;
    for (backend, reported) in [
        ("flash", "flash"),
        ("cudnn", "cudnn"),
        ("efficient", "efficient"),
        ("math", "math"),
        ("auto", ""),
    ] {
        let s = Stack::new(&sdpa_cuda(backend, ""), Kind::BFloat16)?;
        copy_weights(&reference, &s)?;
        let a = s.layer(0)?;
        let out = tch::no_grad(|| a.forward(&AttentionInput::new(&x)))?;
        let ran = a.core_attention().backend();
        if backend != "auto" && ran.as_deref() != Some(reported) {
            bail!("{backend}: libtorch ran {ran:?}");
        }
        println!("sdpa-cuda backend {backend}: ran {ran:?}");
        assert_close(&out.output, &want, 2e-2, 2e-2, &format!("sdpa-cuda {backend}"))?;
        // The same call again (libtorch's choice remembered; cuDNN then runs without it): the
        // same kernel, the same bits.
        let again = tch::no_grad(|| a.forward(&AttentionInput::new(&x)))?;
        if !again.output.equal(&out.output) || a.core_attention().backend() != ran {
            bail!("{backend}: a repeated call differs ({:?})", a.core_attention().backend());
        }
        // Gradients, twice (the choice with gradients is a new one, then remembered; backward
        // kernels may add in any order, so not bit for bit).
        for round in 0..2 {
            let g = input_grad(&s)?;
            assert_close(&g, &want_grad, 5e-2, 5e-2, &format!("sdpa-cuda {backend} grad {round}"))?;
        }
    }
    // Packed sequences through varlen flash: each sequence as if alone, gradients too.
    let s = Stack::new(&sdpa_cuda("auto", "position_embedding_type = \"rope\""), Kind::BFloat16)?;
    let a = s.layer(0)?;
    let lens = [5i64, 64, 1, 33];
    let packed = PackedSeqParams::from_lengths(&lens, GPU);
    let total: i64 = lens.iter().sum();
    let xp = (Tensor::randn([total, 1, 256], (Kind::Float, GPU)) * 0.5)
        .to_kind(Kind::BFloat16)
        .set_requires_grad(true);
    let rope = s.rope(64).context("rope")?;
    let out = a.forward(&AttentionInput::new(&xp).with_packed(&packed).with_rotary(&rope))?;
    out.output.to_kind(Kind::Float).sum(Kind::Float).backward();
    if a.core_attention().backend().as_deref() != Some("varlen-flash") {
        bail!("packed bf16 did not take the varlen path");
    }
    let mut start = 0;
    for l in lens {
        let xs = xp.narrow(0, start, l).detach().set_requires_grad(true);
        let o = a.forward(&AttentionInput::new(&xs).with_rotary(&rope))?;
        o.output.to_kind(Kind::Float).sum(Kind::Float).backward();
        assert_close(
            &out.output.narrow(0, start, l),
            &o.output,
            2e-2,
            2e-2,
            &format!("packed output, length {l}"),
        )?;
        assert_close(
            &xp.grad().narrow(0, start, l),
            &xs.grad(),
            5e-2,
            5e-2,
            &format!("packed grad, length {l}"),
        )?;
        start += l;
    }
    Ok(())
}
