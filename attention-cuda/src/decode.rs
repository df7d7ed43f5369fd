//! `flash_decode` over the static cache, and `paged-attention-cuda`, the fused
//! `flash_decode_and_prefill` over the paged cache: both launch `kernels/attention.cu`.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use attention_core::inference::{FlashDecode, StaticDecodeStep};
use attention_core::sdpa::PlainSdpa;
use attention_spec::ForwardError;
use attention_spec::module::{
    ContinuedChunk, CoreAttention, CoreAttentionInput, PagedKv, PromptTail,
};
use tch::{Kind, Tensor};

use crate::Error;
pub use crate::KernelPath;
use crate::launch::{
    Geometry, MergeParams, Params, append, capturing, check_head_dim, check_tensor, cuda_index,
    dtype_name, launch, merge, scale_log2, tensor_cores_apply,
};
use crate::shim::cudnn_with_lse;

fn size4(name: &'static str, t: &Tensor) -> Result<[i64; 4], Error> {
    <[i64; 4]>::try_from(t.size())
        .map_err(|s| Error::Input(format!("{name}: expected 4 dims, got {s:?}")))
}

/// The static-cache decode kernel (Megatron's `flash_decode`).
///
/// The launch (split-KV) is sized by `StaticDecodeStep::max_sequence_offset` when the host
/// gives it, by the cache's length otherwise. While a CUDA graph is being captured it keeps
/// as many splits as the cache's length wants, each at least the bound's share: the kernel
/// spreads a row's keys over all of them, so replays stay balanced at any offset, and a bound
/// below a row's offset costs speed, never keys. The offsets themselves are not read back:
/// each must be below the cache's length. The cache's batch rows x groups must stay below
/// 2^21 ([`Error::Unsupported`] otherwise).
#[derive(Debug, Clone, Copy)]
pub struct CudaFlashDecode {
    /// Which kernel runs the step.
    pub path: KernelPath,
    /// Key/value heads per block of the tensor-core decode build: `None` (the default) lets
    /// each launch choose (several neighbouring heads per block where the blocks still fill
    /// the GPU unsplit); 1, 2 or 4 force it ([`Error::Unsupported`] where the heads do not
    /// divide by it or a block would hold more than 16 query heads).
    pub heads_per_block: Option<i64>,
    /// Programmatic dependent launch of the split-KV combine (on by default; compute
    /// capability 9.0 and newer, ignored before): its blocks are scheduled while the attention
    /// kernel's last blocks finish, and wait for it to complete before they read anything
    /// (split launches up to 1.5% faster on H100 and H200). The attention kernel itself always
    /// launches after the previous kernel on the stream has completed.
    pub programmatic_launch: bool,
}

impl Default for CudaFlashDecode {
    fn default() -> Self {
        Self { path: KernelPath::Auto, heads_per_block: None, programmatic_launch: true }
    }
}

/// The static cache's batch rows x groups must stay below this (see `StaticTiles` in the
/// kernel source).
const MAX_POSITION_SLOTS: i64 = 1 << 21;

impl CudaFlashDecode {
    /// With an explicit kernel path (the default is [`KernelPath::Auto`]).
    pub fn with_path(path: KernelPath) -> Self {
        Self { path, ..Self::default() }
    }

    /// With `n` key/value heads per block (see [`CudaFlashDecode::heads_per_block`]).
    pub fn with_heads_per_block(self, n: i64) -> Self {
        Self { heads_per_block: Some(n), ..self }
    }

    /// With programmatic dependent launch on or off (see
    /// [`CudaFlashDecode::programmatic_launch`]).
    pub fn with_programmatic_launch(self, on: bool) -> Self {
        Self { programmatic_launch: on, ..self }
    }
}

impl From<KernelPath> for CudaFlashDecode {
    fn from(path: KernelPath) -> Self {
        Self::with_path(path)
    }
}

impl CudaFlashDecode {
    /// Runs one decode step; see [`StaticDecodeStep`].
    pub fn run(&self, s: &StaticDecodeStep<'_>) -> Result<Tensor, Error> {
        let [one, b, np, hd] = size4("query", s.query)?;
        let [max_seq, max_batch, ngp, hdk] = size4("key_cache", s.key_cache)?;
        if one != 1 || hdk != hd || ngp == 0 || np % ngp != 0 {
            return Err(Error::Input(format!(
                "query {:?} does not fit the cache {:?}",
                s.query.size(),
                s.key_cache.size()
            )));
        }
        for (name, t) in [("key", s.key), ("value", s.value)] {
            if t.size() != [1, b, ngp, hd] {
                return Err(Error::Input(format!(
                    "{name}: expected [1, {b}, {ngp}, {hd}], got {:?}",
                    t.size()
                )));
            }
        }
        if s.value_cache.size() != s.key_cache.size() {
            return Err(Error::Input("value_cache and key_cache differ in shape".into()));
        }
        // The tensor-core decode build steps between a thread's key rows with a 32-bit byte
        // offset: 2048 x max_batch x groups bytes (any dtype and head dimension).
        if max_batch * ngp >= MAX_POSITION_SLOTS {
            return Err(Error::Unsupported(format!(
                "a cache of {max_batch} batch rows x {ngp} groups per position (fewer than {MAX_POSITION_SLOTS})"
            )));
        }
        if s.batch_offset < 0 || s.batch_offset + b > max_batch {
            return Err(Error::Input(format!(
                "batch rows {}..{} outside the cache's {max_batch}",
                s.batch_offset,
                s.batch_offset + b
            )));
        }
        let scale = scale_log2(s.softmax_scale)?;
        let kind = s.query.kind();
        dtype_name(kind)?;
        check_head_dim(hd)?;
        let device = s.query.device();
        let ordinal = cuda_index("query", s.query)?;
        for (name, t) in [
            ("query", s.query),
            ("key", s.key),
            ("value", s.value),
            ("key_cache", s.key_cache),
            ("value_cache", s.value_cache),
        ] {
            check_tensor(name, t, kind, device)?;
        }
        check_tensor("sequence_offsets", s.sequence_offsets, Kind::Int, device)?;
        if s.sequence_offsets.size() != [b] {
            return Err(Error::Input(format!(
                "sequence_offsets: expected [{b}], got {:?}",
                s.sequence_offsets.size()
            )));
        }
        // Keys the launch is sized by: every row's cached tokens plus the new one.
        let max_keys = match s.max_sequence_offset {
            None => max_seq,
            Some(m) if (0..max_seq).contains(&m) => m + 1,
            Some(m) => {
                return Err(Error::Input(format!(
                    "max_sequence_offset {m}: outside the cache's positions 0..{max_seq}"
                )));
            }
        };
        let out = Tensor::f_empty([1, b, np * hd], (kind, device))?;
        let mut p = Params {
            q: s.query.data_ptr() as u64,
            k_new: s.key.data_ptr() as u64,
            v_new: s.value.data_ptr() as u64,
            k_cache: s.key_cache.data_ptr() as u64,
            v_cache: s.value_cache.data_ptr() as u64,
            out: out.data_ptr() as u64,
            kv_len: s.sequence_offsets.data_ptr() as u64,
            seq_stride: max_batch * ngp * hd,
            batch_stride: ngp * hd,
            batch_offset: s.batch_offset as i32,
            scale_log2: scale,
            ..Params::default()
        };
        if let Some(r) = s.rotary {
            let [rows, half] = <[i64; 2]>::try_from(r.cos.size())
                .map_err(|s| Error::Input(format!("cos: expected 2 dims, got {s:?}")))?;
            if r.sin.size() != [rows, half] || rows < max_seq || 2 * half > hd {
                return Err(Error::Input(format!(
                    "rotary cos/sin {:?} do not cover {max_seq} positions of {hd} channels",
                    r.cos.size()
                )));
            }
            check_tensor("cos", r.cos, Kind::Float, device)?;
            check_tensor("sin", r.sin, Kind::Float, device)?;
            p.cos = r.cos.data_ptr() as u64;
            p.sin = r.sin.data_ptr() as u64;
            p.rot_half = half as i32;
            p.interleaved = i32::from(r.interleaved);
        }
        let geo = Geometry {
            n_rows: b,
            max_q: 1,
            hkv: ngp,
            group: np / ngp,
            max_keys,
            capacity: max_seq,
            total_tokens: b,
            heads_per_block: self.heads_per_block,
            programmatic: self.programmatic_launch,
        };
        launch(false, self.path, kind, hd, ordinal, p, geo)?;
        Ok(out)
    }
}

impl FlashDecode for CudaFlashDecode {
    fn flash_decode(&self, step: &StaticDecodeStep<'_>) -> Result<Tensor, ForwardError> {
        self.run(step).map_err(Into::into)
    }
}

/// Query tokens (all prompts together) from which the trailing prompts without cached keys of
/// a step (`PagedKv::prompt_tail`) are attended by libtorch's kernels on the inputs rather than
/// by ours over the pages, at head dimension 128 ([`prompt_route_min_tokens`] scales it).
/// Same-process bench on an H200 (32/8 heads, head dimension 128, causal; TFLOP/s, libtorch's
/// route vs our kernel): one prompt of 128, 256 and 512 tokens 4.9 vs 8.0, 19.2 vs 26.0, 64.5
/// vs 68.9 (the route's host work shows); 1024 173 vs 137, 4096 464 vs 257; 64 prompts of 64
/// 29.5 vs 20.8, 16 of 256 86.9 vs 71.5, 4 of 1024 179 vs 167.
pub const PROMPT_ROUTE_MIN_TOKENS: i64 = 1024;

/// The route's threshold at head dimension `hd`: [`PROMPT_ROUTE_MIN_TOKENS`] x 128 / `hd`. The
/// route's host work is fixed while its kernels' work shrinks with the head dimension: at 64,
/// one prompt of 1024 tokens ran 98-100 TFLOP/s routed against our kernel's 123 (H100), 4096
/// tokens 340-353 against 214-217.
pub fn prompt_route_min_tokens(hd: i64) -> i64 {
    at_head_dim(PROMPT_ROUTE_MIN_TOKENS, hd)
}

/// Attention work ([`chunk_flop`]) from which a prompt's later chunk
/// (`PagedKv::continued_chunk`) is attended by cuDNN over a gathered copy of its cached keys
/// and over its own rather than by our kernel over the pages. Same-process bench on an H200
/// (32/8 heads, bf16; TFLOP/s, routed vs our kernel, two processes; more hosts in
/// BENCHMARKS.md), new tokens on cached ones at head dimension 128: 128 on 4096 (8.7 GFLOP) 82
/// vs 120, 256 on 1024 (4.8) 44-49 vs 68, 512 on 1536 (15.0) 142-145 vs 161, 256 on 4096
/// (17.7) 165 vs 141, 1024 on 1024 (25.8) 237-240 vs 89, 512 on 3584 (32.2) 284 vs 183, 4096
/// on 4096 540-558 vs 240; at 64: 512 on 3584 (16.1) 88-155 vs 128-133, 1024 on 3072 (30.1)
/// 185-261 vs 92. The route's host work is fixed, so the threshold is work, not tokens.
pub const CHUNK_ROUTE_MIN_FLOP: f64 = 2e10;

/// A continued chunk's attention work in FLOP with `heads` query heads of dimension `hd`:
/// 4 x heads x hd x tokens x (cached + tokens / 2) (two matrix products over its cached keys
/// and half its own).
pub fn chunk_flop(c: &ContinuedChunk, heads: i64, hd: i64) -> f64 {
    4.0 * (heads * hd) as f64 * c.tokens as f64 * (c.cached as f64 + c.tokens as f64 / 2.0)
}

/// A route threshold of `tokens` at head dimension 128, at `hd` (the route's host work is fixed,
/// its kernels' work per token proportional to the head dimension).
fn at_head_dim(tokens: i64, hd: i64) -> i64 {
    tokens.saturating_mul(128) / hd.max(1)
}

/// `paged-attention-cuda`: `flash_decode_and_prefill` over the paged cache.
///
/// `PagedKv::max_seqlen_q` and `max_seqlen_k` size the launch (tiles, split-KV) and are not
/// read back from the device: understating them costs speed, never keys (the kernel spreads a
/// longer row over all of the launch's splits). `slot_mapping` is not read: the kernel appends
/// each new token at the slot its request's block table gives its position.
///
/// On [`KernelPath::Auto`], a step's trailing prompts without cached keys
/// (`PagedKv::prompt_tail`: bf16/f16, head dimension 32, 64 or 128, at least
/// [`prompt_route_min_tokens`] tokens) need nothing from the pages: their keys are their own
/// inputs. They are attended there by libtorch's fused kernels, causally with GQA (one prompt:
/// `scaled_dot_product_attention` under the current backend switches, cuDNN's kernel on
/// H100/H200; several: the variable-length flash forward), and only appended by ours; the
/// requests before them (decode tokens, continued chunks) run our kernel, sized by the tail's
/// `head_max_seqlen_q` and `head_max_seqlen_k`. `max_seqlen_q` must then not understate the
/// longest prompt (the flash forward covers that many tokens of each).
///
/// Likewise a prompt's later chunk (`PagedKv::continued_chunk`, the request before the tail) of
/// at least [`CHUNK_ROUTE_MIN_FLOP`] of work ([`chunk_flop`]): its cached keys and values are
/// gathered from its blocks into contiguous memory, cuDNN's kernel attends the chunk over them
/// (no mask) and over its own new keys (causal), each with its log-sum-exp, and a merge kernel
/// of ours combines the two into the chunk's rows; the requests before it run our kernel, sized by the
/// chunk's `before_max_seqlen_q` and `before_max_seqlen_k`, and so do the prompts after it when
/// they are too few to route. The other paths always run our kernel over the whole step.
///
/// Our kernel is launched first, on the requests before the routed ones, so that the GPU runs
/// it while the host prepares libtorch's calls (same-host A/B on an H200: a one-call mixed step
/// 1-2% faster, as fast as its two parts in two calls). Invalid input is refused before any
/// launch. Where a route's libtorch work fails (out of memory, cuDNN's attention missing on the
/// GPU), our kernel attends those requests in the same call, and [`route_fallbacks`] counts
/// it; after three continued chunks in a row fail, later ones take our kernel without trying.
/// [`with_route_thresholds`](Self::with_route_thresholds) moves both thresholds.
#[derive(Debug, Clone, Copy)]
pub struct CudaPagedAttention {
    scale: f64,
    path: KernelPath,
    programmatic: bool,
    /// Route thresholds: prompt tails' tokens at head dimension 128, continued chunks' FLOP.
    route: (i64, f64),
}

impl CudaPagedAttention {
    /// With a softmax scale, on [`KernelPath::Auto`], with programmatic dependent launch and the
    /// default route thresholds.
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            path: KernelPath::Auto,
            programmatic: true,
            route: (PROMPT_ROUTE_MIN_TOKENS, CHUNK_ROUTE_MIN_FLOP),
        }
    }

    /// The same with other route thresholds: on [`KernelPath::Auto`], prompt tails from
    /// `prompt_tokens` tokens at head dimension 128 (scaled by 128 / head dimension) and
    /// continued chunks from `chunk_flop` of work ([`chunk_flop`]) go to libtorch's kernels
    /// (0: always; `i64::MAX` or infinity: never). The defaults, [`PROMPT_ROUTE_MIN_TOKENS`]
    /// and [`CHUNK_ROUTE_MIN_FLOP`], were measured on H100 and H200 hosts; a slower host may
    /// want them higher.
    pub fn with_route_thresholds(self, prompt_tokens: i64, chunk_flop: f64) -> Self {
        Self { route: (prompt_tokens, chunk_flop), ..self }
    }

    /// The same with an explicit kernel path.
    pub fn with_path(self, path: KernelPath) -> Self {
        Self { path, ..self }
    }

    /// The same with programmatic dependent launch on or off (see
    /// [`CudaFlashDecode::programmatic_launch`]).
    pub fn with_programmatic_launch(self, on: bool) -> Self {
        Self { programmatic: on, ..self }
    }

    /// The kernel path.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// Appends the step's keys and values and attends; see `CoreAttention::forward_paged`.
    pub fn run(
        &self,
        input: &CoreAttentionInput<'_>,
        paged: &PagedKv<'_>,
    ) -> Result<Tensor, Error> {
        // The kernel reads packed rows: make the (usually strided) projections contiguous.
        let (q, k, v) =
            (input.query.f_contiguous()?, input.key.f_contiguous()?, input.value.f_contiguous()?);
        let input = &CoreAttentionInput { query: &q, key: &k, value: &v, ..*input };
        let [t, one, np, hd] = size4("query", input.query)?;
        let [nb, bs, ngp, hdk] = size4("key_cache", paged.key_cache)?;
        if one != 1 || hdk != hd || ngp == 0 || np % ngp != 0 {
            return Err(Error::Input(format!(
                "query {:?} does not fit the cache {:?}",
                input.query.size(),
                paged.key_cache.size()
            )));
        }
        for (name, x) in [("key", input.key), ("value", input.value)] {
            if x.size() != [t, 1, ngp, hd] {
                return Err(Error::Input(format!(
                    "{name}: expected [{t}, 1, {ngp}, {hd}], got {:?}",
                    x.size()
                )));
            }
        }
        if paged.value_cache.size() != [nb, bs, ngp, hd] {
            return Err(Error::Input("value_cache and key_cache differ in shape".into()));
        }
        let scale = scale_log2(self.scale)?;
        let kind = input.query.kind();
        dtype_name(kind)?;
        check_head_dim(hd)?;
        let device = input.query.device();
        let ordinal = cuda_index("query", input.query)?;
        for (name, x) in [
            ("query", input.query),
            ("key", input.key),
            ("value", input.value),
            ("key_cache", paged.key_cache),
            ("value_cache", paged.value_cache),
        ] {
            check_tensor(name, x, kind, device)?;
        }
        let bt = paged.block_table.size();
        let n = bt.first().copied().unwrap_or(0);
        if bt.len() != 2 || paged.cu_seqlens_q.size() != [n + 1] || paged.seqlens_k.size() != [n] {
            return Err(Error::Input(format!(
                "block_table {bt:?}, cu_seqlens_q {:?}, seqlens_k {:?} do not describe the same requests",
                paged.cu_seqlens_q.size(),
                paged.seqlens_k.size()
            )));
        }
        for (name, x) in [
            ("block_table", paged.block_table),
            ("cu_seqlens_q", paged.cu_seqlens_q),
            ("seqlens_k", paged.seqlens_k),
        ] {
            check_tensor(name, x, Kind::Int, device)?;
        }
        if let Some(tail) = paged.prompt_tail {
            let (r, k) = (tail.request, tail.token);
            if !(0..=n).contains(&r)
                || !(0..=t).contains(&k)
                || (r == 0 && k != 0)
                || (r == n && k != t)
            {
                return Err(Error::Input(format!(
                    "prompt_tail at request {r}, token {k}: outside a step of {n} requests and {t} tokens"
                )));
            }
        }
        if let Some(c) = paged.continued_chunk {
            let (r, k) = paged.prompt_tail.map_or((n, t), |tail| (tail.request, tail.token));
            if c.request < 0
                || c.request + 1 != r
                || c.token < 0
                || c.tokens < 1
                || c.token + c.tokens != k
                || (c.request == 0 && c.token != 0)
                || c.cached < 1
                || (c.cached + bs - 1) / bs > bt[1]
            {
                return Err(Error::Input(format!(
                    "continued_chunk {c:?}: not the request that ends at request {r}, token {k} \
                     (the prompt tail or the step's end) with cached keys in at most {} blocks",
                    bt[1]
                )));
            }
        }
        let empty = || Tensor::f_empty([t, 1, np * hd], (kind, device));
        if t == 0 || n == 0 {
            return Ok(empty()?);
        }
        let p = Params {
            q: input.query.data_ptr() as u64,
            k_new: input.key.data_ptr() as u64,
            v_new: input.value.data_ptr() as u64,
            k_cache: paged.key_cache.data_ptr() as u64,
            v_cache: paged.value_cache.data_ptr() as u64,
            cu_q: paged.cu_seqlens_q.data_ptr() as u64,
            kv_len: paged.seqlens_k.data_ptr() as u64,
            block_table: paged.block_table.data_ptr() as u64,
            block_size: bs as i32,
            bt_stride: bt[1] as i32,
            scale_log2: scale,
            ..Params::default()
        };
        let geo = Geometry {
            n_rows: n,
            max_q: paged.max_seqlen_q,
            hkv: ngp,
            group: np / ngp,
            max_keys: paged.max_seqlen_k,
            capacity: paged.max_seqlen_k,
            total_tokens: t,
            heads_per_block: None,
            programmatic: self.programmatic,
        };
        // Parts of the step that libtorch's kernels attend from the inputs (the type's docs).
        let routable = self.path == KernelPath::Auto && tensor_cores_apply(kind, hd);
        let tail = paged.prompt_tail.filter(|tail| {
            let tokens = t - tail.token;
            routable && tokens > 0 && tokens >= at_head_dim(self.route.0, hd)
        });
        let chunk = paged.continued_chunk.filter(|c| {
            routable
                && CHUNK_ROUTE_FAILURES.load(Ordering::Relaxed) < CHUNK_ROUTE_MAX_FAILURES
                && chunk_flop(c, np, hd) >= self.route.1
        });
        // A CUDA graph being captured would freeze the routes' host lengths (gathers, libtorch's
        // shapes) for every replay: the whole step takes our kernel, which reads them on the GPU.
        let (tail, chunk) = if (tail.is_some() || chunk.is_some()) && capturing(kind, hd, ordinal)?
        {
            (None, None)
        } else {
            (tail, chunk)
        };
        // The first routed request and token, and the bounds of the requests before them.
        let first =
            chunk.map(|c| (c.request, c.token, c.before_max_seqlen_q, c.before_max_seqlen_k));
        let first = first
            .or(tail.map(|tl| (tl.request, tl.token, tl.head_max_seqlen_q, tl.head_max_seqlen_k)));
        let Some((r1, t1, max_q1, max_k1)) = first else {
            let out = empty()?;
            let p = Params { out: out.data_ptr() as u64, ..p };
            launch(true, self.path, kind, hd, ordinal, p, geo)?;
            return Ok(out);
        };
        let elt = kind.elt_size_in_bytes() as u64;
        let rows = Rows { q: (np * hd) as u64 * elt, kv: (ngp * hd) as u64 * elt, table: bt[1] };
        // Appends the new keys and values of requests `r0..r2` (tokens `t0..t2`), which libtorch
        // attended.
        let append_from = |(r0, t0): (i64, i64), (r2, t2): (i64, i64)| -> Result<(), Error> {
            if t2 > t0 {
                // From request r0 on; the offsets and rows stay the step's.
                let p = Params {
                    cu_q: p.cu_q + 4 * r0 as u64,
                    kv_len: p.kv_len + 4 * r0 as u64,
                    block_table: p.block_table + 4 * (r0 * rows.table) as u64,
                    token0: t0 as i32,
                    ..p
                };
                append(kind, hd, ordinal, p, (r2 - r0, ngp, t2 - t0))?;
            }
            Ok(())
        };
        // The tail's prompts through libtorch.
        let tail_attention = |tail: PromptTail| -> Result<Tensor, Error> {
            injected_route_failure()?;
            let (r0, t0) = (tail.request, tail.token);
            let part = |x: &Tensor| x.f_narrow(0, t0, t - t0);
            let (q, k, v) = (part(input.query)?, part(input.key)?, part(input.value)?);
            let (cu, max_q) = ((r0, t0, paged.cu_seqlens_q), paged.max_seqlen_q);
            let shape = [n - r0, np, ngp, hd];
            tch::no_grad(|| self.prompts((&q, &k, &v), cu, max_q, shape))
        };
        if let (None, Some(tail)) = (chunk, tail)
            && tail.token == 0
        {
            // Prompts only: libtorch's output is the step's (its failure writes nothing, and our
            // kernel takes the whole step).
            match tail_attention(tail) {
                Ok(out) => {
                    append_from((0, 0), (n, t))?;
                    return Ok(out);
                }
                Err(_) => {
                    ROUTE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    let out = empty()?;
                    let p = Params { out: out.data_ptr() as u64, ..p };
                    launch(true, self.path, kind, hd, ordinal, p, geo)?;
                    return Ok(out);
                }
            }
        }
        let out = empty()?;
        let p = Params { out: out.data_ptr() as u64, ..p };
        // Our kernel over requests `r0..r2` (tokens `t0..t2`, at most `max_q` queries and
        // `max_k` keys each), appending their new keys and values.
        let kernel = |(r0, t0): (i64, i64), (r2, t2): (i64, i64), max_q: i64, max_k: i64| {
            let cu = offsets(paged.cu_seqlens_q, r0, r2, t0)?;
            let part = Geometry {
                n_rows: r2 - r0,
                max_q,
                max_keys: max_k,
                capacity: max_k,
                total_tokens: t2 - t0,
                ..geo
            };
            launch(true, self.path, kind, hd, ordinal, from_request(p, r0, t0, &cu, rows), part)
        };
        // Our kernel first, on the requests before the routed ones (it appends them): the GPU
        // runs it while the host prepares libtorch's calls.
        if t1 > 0 {
            let head = Geometry {
                n_rows: r1,
                max_q: max_q1,
                max_keys: max_k1,
                capacity: max_k1,
                total_tokens: t1,
                ..geo
            };
            launch(true, self.path, kind, hd, ordinal, p, head)?;
        }
        // A route whose libtorch work fails (out of memory; cuDNN's attention missing) leaves its
        // requests to our kernel within the call.
        let parts = match chunk {
            Some(c) => match tch::no_grad(|| self.chunk_parts(input, paged, c)) {
                Ok(parts) => {
                    CHUNK_ROUTE_FAILURES.store(0, Ordering::Relaxed);
                    Some((c, parts))
                }
                Err(_) => {
                    CHUNK_ROUTE_FAILURES.fetch_add(1, Ordering::Relaxed);
                    ROUTE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    let keys = c.cached + c.tokens;
                    let end = (c.request + 1, c.token + c.tokens);
                    kernel((c.request, c.token), end, c.tokens, keys)?;
                    None
                }
            },
            None => None,
        };
        // Prompts: as many keys as queries.
        let longest = paged.max_seqlen_q;
        let attended = match tail {
            Some(tail) => match tail_attention(tail) {
                Ok(attended) => Some((tail, attended)),
                Err(_) => {
                    ROUTE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    kernel((tail.request, tail.token), (n, t), longest, longest)?;
                    None
                }
            },
            None => None,
        };
        // Prompts after a routed chunk that the route leaves (too few tokens): our kernel.
        if let Some(tl) = paged.prompt_tail.filter(|_| chunk.is_some() && tail.is_none())
            && tl.token < t
        {
            kernel((tl.request, tl.token), (n, t), longest, longest)?;
        }
        // The chunk's two parts merged into its rows.
        if let Some((c, [a, lse_a, b, lse_b])) = &parts {
            let m = MergeParams {
                a: a.data_ptr() as u64,
                b: b.data_ptr() as u64,
                lse_a: lse_a.data_ptr() as u64,
                lse_b: lse_b.data_ptr() as u64,
                out: p.out + c.token as u64 * rows.q,
                a_stride: a.stride()[0],
                b_stride: b.stride()[0],
                out_stride: np * hd,
                lse_a_head: lse_a.stride()[1],
                lse_b_head: lse_b.stride()[1],
                tokens: c.tokens as i32,
                heads: np as i32,
            };
            merge(kind, hd, ordinal, m)?;
        }
        // The keys and values of what libtorch attended (the chunk's, then the tail's: adjacent).
        let chunk_range = parts
            .as_ref()
            .map(|(c, _)| ((c.request, c.token), (c.request + 1, c.token + c.tokens)));
        let tail_range = attended.as_ref().map(|(tl, _)| ((tl.request, tl.token), (n, t)));
        match (chunk_range, tail_range) {
            (Some((from, _)), Some((_, to))) => append_from(from, to)?,
            (Some((from, to)), None) | (None, Some((from, to))) => append_from(from, to)?,
            (None, None) => {}
        }
        if let Some((tail, attended)) = attended {
            out.f_narrow(0, tail.token, t - tail.token)?.f_copy_(&attended)?;
        }
        Ok(out)
    }
}

/// Byte sizes of a paged step's query (and output) rows and new key (and value) rows, and the
/// block table's row length in entries.
#[derive(Debug, Clone, Copy)]
struct Rows {
    q: u64,
    kv: u64,
    table: i64,
}

/// `p` for the step's requests from `r0` on, whose query tokens start at `t0`, with `cu` their
/// query offsets from there.
fn from_request(p: Params, r0: i64, t0: i64, cu: &Tensor, rows: Rows) -> Params {
    let t0 = t0 as u64;
    Params {
        q: p.q + t0 * rows.q,
        out: p.out + t0 * rows.q,
        k_new: p.k_new + t0 * rows.kv,
        v_new: p.v_new + t0 * rows.kv,
        cu_q: cu.data_ptr() as u64,
        kv_len: p.kv_len + 4 * r0 as u64,
        block_table: p.block_table + 4 * (r0 * rows.table) as u64,
        ..p
    }
}

/// `cu_seqlens_q[r0..=r1] - t0`: the query offsets of requests `r0..r1` from their first token
/// `t0` (a view when `r0` is 0).
fn offsets(cu: &Tensor, r0: i64, r1: i64, t0: i64) -> Result<Tensor, Error> {
    let part = cu.f_narrow(0, r0, r1 - r0 + 1)?;
    Ok(if t0 == 0 { part } else { part.f_sub_scalar(t0)? })
}

/// `x` in the layout the merge reads: `[tokens, 1, heads, hd]` rows of 16-byte aligned chunks,
/// heads `hd` apart (what cuDNN gives; a copy otherwise).
fn mergeable(x: Tensor, hd: i64) -> Result<Tensor, Error> {
    let elt = x.kind().elt_size_in_bytes() as i64;
    let st = x.stride();
    let fits = st[3] == 1
        && st[2] == hd
        && (st[0] * elt) % 16 == 0
        && (x.data_ptr() as usize).is_multiple_of(16);
    Ok(if fits { x } else { x.f_contiguous()? })
}

impl CudaPagedAttention {
    /// Causal attention of prompts over their own keys and values (see the type's
    /// documentation): `q` `[tt, 1, np, hd]`, `k`, `v` `[tt, 1, ngp, hd]`, the `n` prompts
    /// being requests `r0..` of the step, from its token `t0` (`cu_seqlens_q` the step's
    /// offsets), `max_q` at least the longest; out `[tt, 1, np * hd]`.
    fn prompts(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (r0, t0, cu_seqlens_q): (i64, i64, &Tensor),
        max_q: i64,
        [n, np, ngp, hd]: [i64; 4],
    ) -> Result<Tensor, Error> {
        let tt = q.size()[0];
        if n == 1 {
            let call = PlainSdpa { causal: true, scale: self.scale, dropout: 0.0, gqa: np != ngp };
            return crate::shim::sdpa_sbhd(q, k, v, LIBTORCH_CHOICE, &call);
        }
        let cu = offsets(cu_seqlens_q, r0, r0 + n, t0)?;
        let [out, ..] = crate::shim::flash_varlen_forward(
            &q.f_view([tt, np, hd])?,
            &k.f_view([tt, ngp, hd])?,
            &v.f_view([tt, ngp, hd])?,
            &cu,
            &cu,
            max_q,
            max_q,
            0.0,
            true,
            self.scale,
        )?;
        Ok(out.f_view([tt, 1, np * hd])?)
    }
}

impl CudaPagedAttention {
    /// A continued chunk's attention through cuDNN (see the type's documentation): over its
    /// cached keys, gathered from its blocks, without a mask, and over its own new keys
    /// causally, each with its log-sum-exp. `[out_a, lse_a, out_b, lse_b]`: outputs
    /// `[tokens, 1, np, hd]` as the merge reads them, log-sum-exps `[1, np, tokens]` with
    /// tokens adjacent.
    fn chunk_parts(
        &self,
        input: &CoreAttentionInput<'_>,
        paged: &PagedKv<'_>,
        c: ContinuedChunk,
    ) -> Result<[Tensor; 4], Error> {
        injected_route_failure()?;
        let [nb, bs, ngp, hd] = size4("key_cache", paged.key_cache)?;
        let blocks = (c.cached + bs - 1) / bs;
        // Clamped into the cache: a table that breaks the promise reads wrong keys, never
        // outside the cache.
        let ids = paged.block_table.f_select(0, c.request)?.f_narrow(0, 0, blocks)?;
        let ids = ids.f_clamp(0, nb - 1)?;
        let gather = |cache: &Tensor| -> Result<Tensor, Error> {
            let rows = cache.f_index_select(0, &ids)?.f_view([blocks * bs, 1, ngp, hd])?;
            Ok(rows.f_narrow(0, 0, c.cached)?)
        };
        let (kc, vc) = (gather(paged.key_cache)?, gather(paged.value_cache)?);
        let part = |x: &Tensor| x.f_narrow(0, c.token, c.tokens);
        let q = part(input.query)?;
        let (a, lse_a) = cudnn_with_lse(&q, &kc, &vc, false, self.scale)?;
        let (b, lse_b) =
            cudnn_with_lse(&q, &part(input.key)?, &part(input.value)?, true, self.scale)?;
        let lse = |l: Tensor| -> Result<Tensor, Error> {
            Ok(if l.stride()[2] == 1 { l } else { l.f_contiguous()? })
        };
        Ok([mergeable(a, hd)?, lse(lse_a)?, mergeable(b, hd)?, lse(lse_b)?])
    }
}

/// `sdpa_sbhd`'s backend code for "`scaled_dot_product_attention`, libtorch's choice".
const LIBTORCH_CHOICE: i64 = -1;

/// Continued chunks whose route failed in a row in this process (reset by one that does not).
static CHUNK_ROUTE_FAILURES: AtomicU32 = AtomicU32::new(0);

/// After this many route failures in a row (a GPU or cuDNN build without cuDNN's attention fails
/// every time), later continued chunks take our kernel without trying the route.
const CHUNK_ROUTE_MAX_FAILURES: u32 = 3;

/// Routed parts of steps that our kernel attended instead, in this process.
static ROUTE_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many routed parts of paged steps (prompt tails, continued chunks; see
/// [`CudaPagedAttention`]) our kernel attended, in this process, because libtorch's kernels
/// failed on them (out of memory, cuDNN's attention missing on the GPU).
pub fn route_fallbacks() -> u64 {
    ROUTE_FALLBACKS.load(Ordering::Relaxed)
}

thread_local! {
    /// Route failures still to inject on this thread (see [`inject_route_failures`]).
    static INJECTED_FAILURES: Cell<u32> = const { Cell::new(0) };
}

/// For tests: the next `n` routed parts of paged steps run on this thread fail before they
/// reach libtorch, as libtorch's failure would.
#[doc(hidden)]
pub fn inject_route_failures(n: u32) {
    INJECTED_FAILURES.with(|f| f.set(n));
}

/// An injected route failure, if one is left on this thread.
fn injected_route_failure() -> Result<(), Error> {
    INJECTED_FAILURES.with(|f| match f.get() {
        0 => Ok(()),
        n => {
            f.set(n - 1);
            Err(Error::Torch("injected route failure".into()))
        }
    })
}

impl CoreAttention for CudaPagedAttention {
    fn kind(&self) -> &'static str {
        "paged-attention-cuda"
    }

    fn forward(&self, _input: &CoreAttentionInput<'_>) -> Result<Tensor, ForwardError> {
        Err(ForwardError::Unsupported {
            module: "paged-attention-cuda",
            what: "a call without paged KV memory (it runs inside a DynamicInferenceContext)"
                .into(),
        })
    }

    fn forward_paged(
        &self,
        input: &CoreAttentionInput<'_>,
        paged: &PagedKv<'_>,
    ) -> Result<Tensor, ForwardError> {
        self.run(input, paged).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prompt route's token threshold scales as 128 / head dimension; the chunk route's is
    /// attention work, which puts the bench's chunks (32 query heads, head dimension 128) on the
    /// sides BENCHMARKS.md measured: 512 new tokens on 1536 cached and 256 on 4096 on our
    /// kernel, 1024 on 1024 and 512 on 3584 routed; at head dimension 64, 512 on 3584 ours and
    /// 1024 on 3072 routed.
    #[test]
    fn route_thresholds_split_the_measured_cases() {
        assert_eq!([128, 64, 32].map(prompt_route_min_tokens), [1024, 2048, 4096]);
        let chunk = |tokens, cached| ContinuedChunk {
            request: 0,
            token: 0,
            tokens,
            cached,
            before_max_seqlen_q: 0,
            before_max_seqlen_k: 0,
        };
        // 4 x heads x hd x tokens x (cached + tokens / 2).
        assert_eq!(chunk_flop(&chunk(2048, 2048), 32, 128), 4.0 * 32.0 * 128.0 * 2048.0 * 3072.0);
        let routed =
            |tokens, cached, hd| chunk_flop(&chunk(tokens, cached), 32, hd) >= CHUNK_ROUTE_MIN_FLOP;
        for (tokens, cached, hd, want) in [
            (512, 1536, 128, false),
            (256, 4096, 128, false),
            (128, 4096, 128, false),
            (1024, 1024, 128, true),
            (512, 3584, 128, true),
            (512, 3584, 64, false),
            (1024, 3072, 64, true),
        ] {
            assert_eq!(routed(tokens, cached, hd), want, "{tokens} on {cached} at {hd}");
        }
    }
}
