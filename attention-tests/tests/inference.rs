//! The inference contexts against the full causal forward (fp32, 1e-5):
//!
//! * static: prefill then single-token decode steps equal one full forward, for MHA, GQA,
//!   Q/K layernorm, rotary (both layouts), batch > 1 at a non-zero `batch_size_offset`, two
//!   layers; limits are typed errors that leave the cache as it was;
//! * dynamic: a seeded random scheduler (arrivals, prompts of 1-64 tokens, token budgets that
//!   chunk the prefill, decode steps, finishes, exhaustion and eviction) where every token's
//!   output equals its request run alone through the full forward, over 200+ schedules, and no
//!   block stays allocated;
//! * block accounting at the edges.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use attention_core::{Attention, AttentionInput, BuiltLayers, RotaryEmbedding, SelfAttention};
use attention_inference::{
    DynamicContextOptions, DynamicInferenceContext, InferenceError, KvMemory,
    StaticInferenceContext,
};
use attention_spec::module::{ContinuedChunk, PromptTail};
use attention_spec::{ForwardError, Model};
use attention_tests::{assert_close, test_devices};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

struct Stack {
    model: Model,
    vs: VarStore,
    layers: BuiltLayers,
}

impl Stack {
    /// The same stack with its parameters in `kind`.
    fn with_kind(mut self, kind: Kind) -> Self {
        self.vs.set_kind(kind);
        self
    }

    fn new(toml: &str, device: Device) -> Result<Self> {
        attention_inference::link();
        let model = Model::from_toml_str(toml, attention_core::registry()?)?;
        let vs = VarStore::new(device);
        let layers = BuiltLayers::build(&vs.root(), &model)?;
        // Visible weights: Megatron's 0.02 init leaves the scores near zero.
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                let fan_in = *t.size().last().unwrap_or(&1) as f64;
                if name.ends_with("weight") && t.dim() == 2 {
                    let _ = t.normal_(0.0, 1.2 / fan_in.sqrt());
                } else if name.contains("layernorm") && name.ends_with("weight") {
                    let _ = t.normal_(1.0, 0.1);
                } else {
                    let _ = t.normal_(0.0, 0.1);
                }
            }
        });
        Ok(Self { model, vs, layers })
    }

    fn attention(&self, i: usize) -> Result<&SelfAttention> {
        match &self.layers.layers[i].2 {
            Attention::SelfAttention(a) => Ok(a),
            Attention::CrossAttention(_) => bail!("expected self attention"),
        }
    }

    fn rope(&self, len: i64, device: Device) -> Option<Tensor> {
        let c = &self.model.config;
        (c.position_embedding_type == attention_spec::config::PositionEmbeddingType::Rope)
            .then(|| RotaryEmbedding::from_config(c).forward(len, 0, device))
    }

    /// The whole stack on `x` `[s, b, h]` without a cache (causal), output + bias between layers.
    fn full(&self, x: &Tensor) -> Result<Tensor> {
        let rope = self.rope(x.size()[0], x.device());
        let mut h = x.shallow_clone();
        for i in 0..self.layers.layers.len() {
            let mut input = AttentionInput::new(&h);
            if let Some(r) = &rope {
                input = input.with_rotary(r);
            }
            let out = self.attention(i)?.forward(&input)?;
            h = with_bias(out);
        }
        Ok(h)
    }

    /// The whole stack on one step inside a context.
    fn step(
        &self,
        x: &Tensor,
        ctx: &mut dyn attention_core::inference::InferenceContext,
        rope: Option<&Tensor>,
    ) -> Result<Tensor, ForwardError> {
        let mut h = x.shallow_clone();
        for i in 0..self.layers.layers.len() {
            let mut input = AttentionInput::new(&h);
            if let Some(r) = rope {
                input = input.with_rotary(r);
            }
            let attn = self
                .attention(i)
                .map_err(|e| ForwardError::Invalid { name: "layers", reason: e.to_string() })?;
            h = with_bias(attn.forward_with_context(&input, ctx)?);
        }
        Ok(h)
    }
}

fn with_bias(out: attention_core::AttentionOutput) -> Tensor {
    match out.bias {
        Some(b) => out.output + b,
        None => out.output,
    }
}

fn config(heads: i64, groups: i64, extra: &str, layers: i64) -> String {
    format!(
        "[transformer]\nnum_layers = {layers}\nhidden_size = 32\nnum_attention_heads = {heads}\n\
         num_query_groups = {groups}\n{}attention_dropout = 0.0\n{extra}\n\
         [attention]\npreset = \"gpt-local\"\n",
        if extra.contains("kv_channels") { "" } else { "kv_channels = 8\n" }
    )
}

fn static_configs() -> Vec<(&'static str, String)> {
    vec![
        ("mha", config(4, 4, "", 2)),
        ("gqa", config(4, 2, "", 2)),
        ("mqa_qk_layernorm", config(4, 1, "qk_layernorm = true\nnormalization = \"RMSNorm\"", 2)),
        ("rope", config(4, 2, "position_embedding_type = \"rope\"", 2)),
        (
            "rope_interleaved_partial",
            config(
                4,
                2,
                "position_embedding_type = \"rope\"\nrotary_interleaved = true\nrotary_percent = 0.5\nqk_layernorm = true",
                2,
            ),
        ),
    ]
}

/// Prefill P tokens, then D single-token decode steps, at batch rows 1..3 of a cache of 4.
#[test]
fn static_prefill_then_decode_equals_full_forward() -> Result<()> {
    for device in test_devices() {
        for (name, toml) in static_configs() {
            tch::manual_seed(7);
            let stack = Stack::new(&toml, device)?;
            let (p, d, b) = (6, 5, 2);
            let x = Tensor::randn([p + d, b, 32], (Kind::Float, device));
            let full = tch::no_grad(|| stack.full(&x))?;
            let mut ctx = StaticInferenceContext::new(4, 16)?;
            ctx.batch_size_offset = 1;
            let rope = stack.rope(16, device);
            let pre = tch::no_grad(|| stack.step(&x.narrow(0, 0, p), &mut ctx, rope.as_ref()))?;
            ctx.advance(p)?;
            assert_close(&pre, &full.narrow(0, 0, p), TOL, TOL, &format!("{name}: prefill"))?;
            ctx.enable_decode_mode();
            for i in 0..d {
                let out =
                    tch::no_grad(|| stack.step(&x.narrow(0, p + i, 1), &mut ctx, rope.as_ref()))?;
                ctx.advance(1)?;
                assert_close(
                    &out,
                    &full.narrow(0, p + i, 1),
                    TOL,
                    TOL,
                    &format!("{name}: decode {i}"),
                )?;
            }
            // Memory allocated once per layer, keyed by the global layer number.
            assert_eq!(ctx.layers().collect::<Vec<_>>(), vec![1, 2]);
            let (k, _) = ctx.key_value_memory(1).context("layer 1 memory")?;
            let groups = stack.model.config.num_query_groups;
            assert_eq!(k.size(), vec![16, 4, groups, 8]);
        }
    }
    Ok(())
}

/// A prefill split into chunks (our extension: a bottom-right causal mask) equals one prefill.
#[test]
fn static_chunked_prefill() -> Result<()> {
    tch::manual_seed(3);
    let stack = Stack::new(&config(4, 2, "position_embedding_type = \"rope\"", 1), Device::Cpu)?;
    let x = Tensor::randn([10, 1, 32], (Kind::Float, Device::Cpu));
    let full = tch::no_grad(|| stack.full(&x))?;
    let mut ctx = StaticInferenceContext::new(1, 10)?;
    let rope = stack.rope(10, Device::Cpu);
    let mut outs = Vec::new();
    for (start, len) in [(0, 4), (4, 3), (7, 3)] {
        outs.push(tch::no_grad(|| stack.step(&x.narrow(0, start, len), &mut ctx, rope.as_ref()))?);
        ctx.advance(len)?;
    }
    assert_close(&Tensor::cat(&outs, 0), &full, TOL, TOL, "chunked prefill")
}

fn context_error(e: ForwardError) -> Result<InferenceError> {
    match e {
        ForwardError::Context(inner) => match inner.downcast::<InferenceError>() {
            Ok(e) => Ok(*e),
            Err(other) => bail!("not an InferenceError: {other}"),
        },
        other => bail!("expected a context error, got {other}"),
    }
}

/// Exceeding the sequence or batch limit is a typed error naming the limit; the cache is unchanged.
#[test]
fn static_limits_leave_the_cache_unchanged() -> Result<()> {
    let stack = Stack::new(&config(4, 2, "", 1), Device::Cpu)?;
    let mut ctx = StaticInferenceContext::new(2, 8)?;
    let x = Tensor::randn([6, 2, 32], (Kind::Float, Device::Cpu));
    let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
    ctx.advance(6)?;
    let before = ctx.key_value_memory(1).context("memory")?.0.copy();
    let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 3), &mut ctx, None))
        .err()
        .context("expected an error")?;
    assert_eq!(context_error(err)?, InferenceError::SequenceLimit { offset: 6, tokens: 3, max: 8 });
    ctx.batch_size_offset = 1;
    let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 1), &mut ctx, None))
        .err()
        .context("expected an error")?;
    assert_eq!(context_error(err)?, InferenceError::BatchLimit { offset: 1, batch: 2, max: 2 });
    assert!(ctx.key_value_memory(1).context("memory")?.0.equal(&before));
    assert_eq!(ctx.advance(3), Err(InferenceError::SequenceLimit { offset: 6, tokens: 3, max: 8 }));
    // A rotary table too short for the step.
    ctx.batch_size_offset = 0;
    let stack_rope =
        Stack::new(&config(4, 2, "position_embedding_type = \"rope\"", 1), Device::Cpu)?;
    let mut ctx2 = StaticInferenceContext::new(2, 8)?;
    let short = stack_rope.rope(4, Device::Cpu);
    let err = tch::no_grad(|| stack_rope.step(&x, &mut ctx2, short.as_ref()))
        .err()
        .context("expected an error")?;
    assert_eq!(context_error(err)?, InferenceError::RotaryTooShort { rows: 4, needed: 6 });
    assert_eq!(ctx2.layers().count(), 0);
    Ok(())
}

/// `swap_key_value_dict` reorders batch rows in place; `reset` keeps the memory.
#[test]
fn static_swap_and_reset() -> Result<()> {
    let stack = Stack::new(&config(4, 2, "", 1), Device::Cpu)?;
    let mut ctx = StaticInferenceContext::new(3, 4)?;
    assert!(matches!(ctx.swap_key_value_dict(&[0, 1, 2]), Err(InferenceError::Invalid(_))));
    let x = Tensor::randn([2, 3, 32], (Kind::Float, Device::Cpu));
    let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
    let k0 = ctx.key_value_memory(1).context("memory")?.0.copy();
    let ptr = ctx.key_value_memory(1).context("memory")?.0.data_ptr();
    ctx.swap_key_value_dict(&[2, 0, 1])?;
    let k1 = ctx.key_value_memory(1).context("memory")?.0;
    assert_eq!(k1.data_ptr(), ptr);
    assert!(k1.select(1, 0).equal(&k0.select(1, 2)) && k1.select(1, 1).equal(&k0.select(1, 0)));
    assert!(matches!(ctx.swap_key_value_dict(&[0, 1]), Err(InferenceError::Invalid(_))));
    assert!(matches!(ctx.swap_key_value_dict(&[0, 1, 3]), Err(InferenceError::Invalid(_))));
    ctx.advance(2)?;
    ctx.reset();
    assert_eq!(
        (ctx.sequence_len_offset, ctx.batch_size_offset, ctx.is_decode_only()),
        (0, 0, false)
    );
    assert_eq!(ctx.memory_bytes(), 2 * 4 * 3 * 2 * 8 * 4);
    Ok(())
}

/// A tiny deterministic generator (the tests must not depend on libtorch's RNG order).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

struct Req {
    tokens: Tensor, // [L, 1, h]
    prompt: i64,
    arrival: i64,
}

/// What a schedule exercised.
#[derive(Debug, Default)]
struct Coverage {
    steps: usize,
    evictions: usize,
    /// Prefill entries that continue a partly cached prompt.
    chunk_continuations: usize,
    /// Steps holding both decode and prefill tokens.
    mixed_steps: usize,
    /// Steps of prompts without cached keys only, and steps whose trailing prompts without
    /// cached keys follow requests with cached keys (`PagedKv::prompt_tail`, which the CPU
    /// reference checks against the lengths).
    prompt_steps: usize,
    tail_steps: usize,
    /// Steps whose last entry with cached keys is a prompt's chunk
    /// (`PagedKv::continued_chunk`, which the CPU reference checks against the lengths).
    chunk_steps: usize,
}

/// One random schedule.
/// The kernel a schedule runs: a registered paged core-attention kind, its params, the dtype of
/// the stack and the cache, and the tolerance against the full forward in that dtype.
struct PagedKernel {
    kind: &'static str,
    params: &'static str,
    dtype: Kind,
    tol: f64,
}

const REFERENCE: PagedKernel =
    PagedKernel { kind: "paged-attention", params: "", dtype: Kind::Float, tol: TOL };

fn run_schedule(seed: u64, device: Device, pk: &PagedKernel, cov: &mut Coverage) -> Result<()> {
    let paged_kind = pk.kind;
    let mut rng = Lcg(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let heads_groups = [(4, 4), (4, 2), (4, 1)][rng.range(0, 2) as usize];
    let rope = if rng.range(0, 1) == 1 { "position_embedding_type = \"rope\"" } else { "" };
    // The CUDA kernels take head dimensions of 32 and up.
    let rope = if paged_kind.ends_with("-cuda") {
        format!("{rope}\nkv_channels = 32")
    } else {
        rope.to_string()
    };
    let layers = rng.range(1, 2);
    tch::manual_seed(seed as i64);
    let stack = Stack::new(&config(heads_groups.0, heads_groups.1, &rope, layers), device)?
        .with_kind(pk.dtype);
    let block_size = [1, 4, 16, 3, 7][rng.range(0, 4) as usize];
    let n_req = rng.range(1, 6);
    let mut reqs = Vec::new();
    let mut longest = 0;
    for i in 0..n_req {
        let prompt = rng.range(1, 64);
        let decodes = rng.range(0, 6);
        longest = longest.max(prompt + decodes);
        reqs.push(Req {
            tokens: Tensor::randn([prompt + decodes, 1, 32], (pk.dtype, device)),
            prompt,
            arrival: rng.range(0, 4) * i.min(1),
        });
    }
    // Memory: from a tight fit (forcing evictions) to plenty.
    let need_one = (longest + block_size - 1) / block_size;
    let num_blocks = need_one + rng.range(0, need_one * n_req);
    let mut options = DynamicContextOptions::new(layers, block_size, KvMemory::Blocks(num_blocks));
    options.paged_attention = paged_kind.to_string();
    options.paged_attention_params = pk.params.parse()?;
    let mut ctx = DynamicInferenceContext::new(
        &stack.model.config,
        &options,
        pk.dtype,
        device,
        attention_core::registry()?,
    )?;
    let table = stack.rope(longest, device);
    // Outputs per request and position; a request evicted mid-way starts over under a new id.
    let mut outputs: BTreeMap<usize, Vec<Option<Tensor>>> = BTreeMap::new();
    let mut id_of: BTreeMap<u64, usize> = BTreeMap::new();
    let mut next_id = 1000 * seed;
    let mut pending: Vec<usize> = (0..reqs.len()).collect();
    let mut done = 0;
    let mut steps = 0;
    while done < reqs.len() {
        if steps > 5000 {
            bail!("seed {seed}: no progress");
        }
        let (arrived, later): (Vec<usize>, Vec<usize>) =
            pending.iter().partition(|&&r| reqs[r].arrival <= steps as i64);
        pending = later;
        for r in arrived {
            next_id += 1;
            id_of.insert(next_id, r);
            outputs.insert(r, (0..reqs[r].tokens.size()[0]).map(|_| None).collect());
            ctx.add_request(next_id, reqs[r].prompt)?;
        }
        let budget = rng.range(1, 48);
        let plan = match ctx.schedule(budget) {
            Ok(plan) => plan,
            Err(InferenceError::OutOfBlocks { .. }) => {
                // Evict the newest request holding blocks; it restarts under a new id. The
                // refused step must have left every request as it was.
                let snapshot = |ctx: &DynamicInferenceContext| -> Vec<_> {
                    ctx.request_ids()
                        .iter()
                        .map(|&id| ctx.request(id).map(|(p, c, b)| (id, p, c, b.to_vec())))
                        .collect()
                };
                let holders: Vec<u64> = ctx
                    .request_ids()
                    .iter()
                    .copied()
                    .filter(|&id| ctx.request(id).is_some_and(|r| !r.2.is_empty()))
                    .collect();
                if holders.len() < 2 {
                    bail!(
                        "seed {seed}: out of blocks with {} request(s) holding blocks",
                        holders.len()
                    );
                }
                let victim = holders[holders.len() - 1];
                let before = snapshot(&ctx);
                if ctx.schedule(0).map(|p| p.is_empty()) != Ok(true) || snapshot(&ctx) != before {
                    bail!("seed {seed}: a refused step changed the context");
                }
                ctx.finish_request(victim)?;
                cov.evictions += 1;
                let r = id_of.remove(&victim).context("victim")?;
                next_id += 1;
                id_of.insert(next_id, r);
                outputs.insert(r, (0..reqs[r].tokens.size()[0]).map(|_| None).collect());
                ctx.add_request(next_id, reqs[r].prompt)?;
                steps += 1;
                continue;
            }
            Err(e) => bail!("seed {seed}: {e}"),
        };
        steps += 1;
        if plan.is_empty() {
            continue;
        }
        cov.chunk_continuations += plan.entries.iter().filter(|e| !e.decode && e.start > 0).count();
        let decodes = plan.entries.iter().filter(|e| e.decode).count();
        cov.mixed_steps += usize::from(decodes > 0 && decodes < plan.entries.len());
        let fresh = plan.entries.iter().rev().take_while(|e| e.start == 0).count();
        cov.prompt_steps += usize::from(fresh == plan.entries.len());
        cov.tail_steps += usize::from(fresh > 0 && fresh < plan.entries.len());
        // The step's prompt tail is exactly its trailing fresh entries, bounded by the rest.
        let head = &plan.entries[..plan.entries.len() - fresh];
        let want = (fresh > 0).then(|| PromptTail {
            request: head.len() as i64,
            token: head.iter().map(|e| e.tokens).sum(),
            head_max_seqlen_q: head.iter().map(|e| e.tokens).max().unwrap_or(0),
            head_max_seqlen_k: head.iter().map(|e| e.start + e.tokens).max().unwrap_or(0),
        });
        let got = ctx.step_metadata().context("step metadata")?.prompt_tail;
        if got != want {
            bail!("seed {seed}: prompt tail {got:?}, expected {want:?}");
        }
        // Its continued chunk is the head's last entry when that is a prompt's chunk.
        let want = head.split_last().filter(|(e, _)| !e.decode).map(|(e, before)| ContinuedChunk {
            request: before.len() as i64,
            token: before.iter().map(|e| e.tokens).sum(),
            tokens: e.tokens,
            cached: e.start,
            before_max_seqlen_q: before.iter().map(|e| e.tokens).max().unwrap_or(0),
            before_max_seqlen_k: before.iter().map(|e| e.start + e.tokens).max().unwrap_or(0),
        });
        let got = ctx.step_metadata().context("step metadata")?.continued_chunk;
        if got != want {
            bail!("seed {seed}: continued chunk {got:?}, expected {want:?}");
        }
        cov.chunk_steps += usize::from(got.is_some());
        let parts: Vec<Tensor> = plan
            .entries
            .iter()
            .map(|e| reqs[id_of[&e.id]].tokens.narrow(0, e.start, e.tokens))
            .collect();
        let x = Tensor::cat(&parts, 0);
        let out = tch::no_grad(|| stack.step(&x, &mut ctx, table.as_ref()))?;
        ctx.commit_step()?;
        let mut row = 0;
        for e in &plan.entries {
            let r = id_of[&e.id];
            for p in 0..e.tokens {
                outputs.get_mut(&r).context("outputs")?[(e.start + p) as usize] =
                    Some(out.narrow(0, row + p, 1));
            }
            row += e.tokens;
            let (_, cached, _) = ctx.request(e.id).context("request")?;
            if cached == reqs[r].tokens.size()[0] {
                ctx.finish_request(e.id)?;
                done += 1;
            }
        }
    }
    if ctx.used_blocks() != 0 || ctx.free_blocks() != num_blocks {
        bail!(
            "seed {seed}: {} blocks still allocated after every request finished",
            ctx.used_blocks()
        );
    }
    for (r, outs) in &outputs {
        let full = tch::no_grad(|| stack.full(&reqs[*r].tokens))?;
        let got: Vec<Tensor> = outs
            .iter()
            .map(|o| o.as_ref().map(Tensor::shallow_clone).context("a token was never computed"))
            .collect::<Result<_>>()?;
        assert_close(
            &Tensor::cat(&got, 0),
            &full,
            pk.tol,
            pk.tol,
            &format!("seed {seed}, request {r} (block size {block_size})"),
        )?;
    }
    cov.steps += steps;
    Ok(())
}

/// Every token of every request equals that request alone through the full forward.
#[test]
fn dynamic_random_schedules_equal_full_forward() -> Result<()> {
    for device in test_devices() {
        let mut cov = Coverage::default();
        for seed in 1..=220 {
            run_schedule(seed, device, &REFERENCE, &mut cov)?;
        }
        println!("{device:?}: {cov:?}");
        if cov.steps < 2000
            || cov.evictions < 20
            || cov.chunk_continuations < 200
            || cov.mixed_steps < 200
            || cov.prompt_steps < 100
            || cov.tail_steps < 100
            || cov.chunk_steps < 100
        {
            bail!("the schedules exercised too little: {cov:?}");
        }
    }
    Ok(())
}

/// Runs `seeds` schedules through `paged-attention-cuda` with `params`.
#[cfg(feature = "cuda")]
fn cuda_schedules(params: &'static str, dtype: Kind, tol: f64, seeds: u64) -> Result<()> {
    attention_cuda::link();
    let pk = PagedKernel { kind: "paged-attention-cuda", params, dtype, tol };
    let mut cov = Coverage::default();
    for seed in 1..=seeds {
        run_schedule(seed, Device::Cuda(0), &pk, &mut cov)?;
    }
    println!("CUDA kernel {params:?} {dtype:?}: {cov:?}");
    Ok(())
}

/// The same schedules through the CUDA `flash_decode_and_prefill` kernel, fp32 (CUDA cores).
#[cfg(feature = "cuda")]
#[test]
fn dynamic_random_schedules_cuda_kernel() -> Result<()> {
    cuda_schedules("", Kind::Float, TOL, 220)
}

/// Tolerance of the bf16 schedules against the full forward in bf16: both sides round every
/// activation to bf16 and cuBLAS is not bitwise reproducible between runs, so the worst token
/// of 120 schedules moves between runs (up to 7.8e-2 seen on an H200); a wrong key, mask or
/// block gives errors of order 1. `kernel_paths_agree_and_are_deterministic` (tests/cuda.rs)
/// holds the tensor-core kernel to 2e-2 of the CUDA-core one on identical input.
#[cfg(feature = "cuda")]
const BF16_TOL: f64 = 1.5e-1;

/// bf16 with the automatic kernel choice, against the full forward in bf16.
#[cfg(feature = "cuda")]
#[test]
fn dynamic_random_schedules_cuda_kernel_bf16() -> Result<()> {
    cuda_schedules("", Kind::BFloat16, BF16_TOL, 120)
}

/// bf16 forced onto the tensor cores (MHA decode included).
#[cfg(feature = "cuda")]
#[test]
fn dynamic_random_schedules_cuda_tensor_cores() -> Result<()> {
    cuda_schedules("kernel = \"tensor-cores\"", Kind::BFloat16, BF16_TOL, 120)
}

/// bf16 with every prompt tail and continued chunk routed to libtorch's kernels (thresholds 0),
/// so the random schedules run the routes too (the defaults route none of their short steps).
#[cfg(feature = "cuda")]
#[test]
fn dynamic_random_schedules_cuda_routes() -> Result<()> {
    cuda_schedules(
        "prompt_route_min_tokens = 0\nchunk_route_min_flop = 0",
        Kind::BFloat16,
        BF16_TOL,
        120,
    )
}

/// The paged kernel's params are checked when the context is built: an unknown kernel path or
/// parameter and a negative or NaN route threshold are refused, saying which, valid ones pass
/// (and, without CUDA, the kind then says what it needs).
#[test]
fn paged_attention_params_are_validated() -> Result<()> {
    attention_cuda::link();
    let stack = Stack::new(&config(4, 2, "kv_channels = 32", 1), Device::Cpu)?;
    let build = |params: &str| -> Result<String> {
        let mut options = DynamicContextOptions::new(1, 4, KvMemory::Blocks(8));
        options.paged_attention = "paged-attention-cuda".into();
        options.paged_attention_params = params.parse()?;
        let registry = attention_core::registry()?;
        Ok(
            match DynamicInferenceContext::new(
                &stack.model.config,
                &options,
                Kind::Float,
                Device::Cpu,
                registry,
            ) {
                Ok(_) => "built".into(),
                Err(e) => e.to_string(),
            },
        )
    };
    let bad = build("kernel = \"warp-speed\"")?;
    if !(bad.contains("warp-speed")
        && bad.contains("tensor-cores")
        && bad.contains("paged_attention"))
    {
        bail!("unexpected error for an unknown kernel: {bad}");
    }
    for (params, names) in [
        ("prompt_route_min_tokens = -1", "prompt_route_min_tokens = -1"),
        ("chunk_route_min_flop = -1e9", "chunk_route_min_flop = -1000000000"),
        ("chunk_route_min_flop = nan", "chunk_route_min_flop = NaN"),
        ("route = 1", "route"),
    ] {
        let bad = build(params)?;
        if !(bad.contains(names) && bad.contains("paged-attention-cuda")) {
            bail!("unexpected error for {params:?}: {bad}");
        }
    }
    for params in [
        "kernel = \"tensor-cores\"",
        "prompt_route_min_tokens = 0\nchunk_route_min_flop = 0",
        "prompt_route_min_tokens = 4096\nchunk_route_min_flop = 5e10",
        "chunk_route_min_flop = inf",
    ] {
        let good = build(params)?;
        if cfg!(feature = "cuda") {
            if good != "built" {
                bail!("valid params {params:?} were refused: {good}");
            }
        } else if !good.contains("`cuda` feature") {
            bail!("unexpected error without CUDA for {params:?}: {good}");
        }
    }
    Ok(())
}

fn dyn_ctx(blocks: i64, block_size: i64) -> Result<(Stack, DynamicInferenceContext)> {
    let stack = Stack::new(&config(4, 2, "", 1), Device::Cpu)?;
    let options = DynamicContextOptions::new(1, block_size, KvMemory::Blocks(blocks));
    let ctx = DynamicInferenceContext::new(
        &stack.model.config,
        &options,
        Kind::Float,
        Device::Cpu,
        attention_core::registry()?,
    )?;
    Ok((stack, ctx))
}

/// Exact fill, one over, free and reuse, a request longer than the whole memory.
#[test]
fn dynamic_block_accounting_edges() -> Result<()> {
    let (stack, mut ctx) = dyn_ctx(3, 4)?;
    // Longer than the whole memory: refused at admission.
    assert_eq!(
        ctx.add_request(1, 13),
        Err(InferenceError::RequestTooLong { id: 1, tokens: 13, capacity: 12 })
    );
    // Exact fill: 12 prompt tokens take all 3 blocks.
    ctx.add_request(1, 12)?;
    let plan = ctx.schedule(64)?;
    assert_eq!(plan.total_tokens(), 12);
    assert_eq!((ctx.used_blocks(), ctx.free_blocks()), (3, 0));
    let _ = tch::no_grad(|| {
        stack.step(&Tensor::randn([12, 1, 32], (Kind::Float, Device::Cpu)), &mut ctx, None)
    })?;
    ctx.commit_step()?;
    // One over: the decode token needs a 4th block.
    let before = ctx.request(1).map(|(p, c, b)| (p, c, b.to_vec()));
    assert_eq!(ctx.schedule(64), Err(InferenceError::OutOfBlocks { needed: 1, free: 0, total: 3 }));
    assert_eq!(ctx.request(1).map(|(p, c, b)| (p, c, b.to_vec())), before);
    assert!(ctx.step_plan().is_none());
    // Another prompt cannot start either: the step reports it.
    ctx.add_request(2, 1)?;
    assert!(matches!(ctx.schedule(64), Err(InferenceError::OutOfBlocks { .. })));
    // Free and reuse.
    ctx.finish_request(1)?;
    assert_eq!(ctx.free_blocks(), 3);
    let plan = ctx.schedule(64)?;
    assert_eq!(plan.total_tokens(), 1);
    assert_eq!(ctx.used_blocks(), 1);
    // A step in progress blocks finishing and rescheduling; abort returns its blocks.
    assert_eq!(ctx.finish_request(2), Err(InferenceError::StepInProgress));
    assert_eq!(ctx.schedule(8), Err(InferenceError::StepInProgress));
    ctx.abort_step()?;
    assert_eq!((ctx.used_blocks(), ctx.request(2).map(|r| r.1)), (0, Some(0)));
    assert_eq!(ctx.commit_step(), Err(InferenceError::NoStep));
    ctx.finish_request(2)?;
    assert_eq!(ctx.finish_request(2), Err(InferenceError::UnknownRequest(2)));
    assert_eq!(
        ctx.add_request(3, 0).map_err(|e| matches!(e, InferenceError::Invalid(_))),
        Err(true)
    );
    ctx.add_request(3, 2)?;
    assert_eq!(ctx.add_request(3, 2), Err(InferenceError::DuplicateRequest(3)));
    // A chunk shrinks to the free space.
    // (blocks are per request: request 1's half-used block is not request 2's room).
    let (_, mut small) = dyn_ctx(3, 4)?;
    small.add_request(1, 5)?;
    small.add_request(2, 6)?;
    let plan = small.schedule(64)?;
    assert_eq!(
        plan.entries.iter().map(|e| (e.id, e.tokens)).collect::<Vec<_>>(),
        vec![(1, 5), (2, 4)]
    );
    Ok(())
}

/// Layers outside the context and steps of the wrong size are typed errors, and the step can
/// be retried.
#[test]
fn dynamic_bad_steps() -> Result<()> {
    let (stack, mut ctx) = dyn_ctx(4, 4)?;
    ctx.add_request(1, 3)?;
    let x = Tensor::randn([3, 1, 32], (Kind::Float, Device::Cpu));
    let err = tch::no_grad(|| stack.step(&x, &mut ctx, None)).err().context("no step")?;
    assert_eq!(context_error(err)?, InferenceError::NoStep);
    ctx.schedule(8)?;
    let err = tch::no_grad(|| stack.step(&x.narrow(0, 0, 2), &mut ctx, None))
        .err()
        .context("short step")?;
    assert!(matches!(context_error(err)?, InferenceError::StepShape { scheduled: 3, got: 2, .. }));
    let _ = tch::no_grad(|| stack.step(&x, &mut ctx, None))?;
    ctx.commit_step()?;
    // A two-layer model on a one-layer context.
    let two = Stack::new(&config(4, 2, "", 2), Device::Cpu)?;
    ctx.schedule(8)?;
    let err =
        tch::no_grad(|| two.step(&x.narrow(0, 0, 1), &mut ctx, None)).err().context("layer 2")?;
    assert_eq!(
        context_error(err)?,
        InferenceError::UnknownLayer { layer_number: 2, first: 1, last: 1 }
    );
    ctx.abort_step()?;
    Ok(())
}
