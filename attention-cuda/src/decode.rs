//! `flash_decode` over the static cache, and `paged-attention-cuda`, the fused
//! `flash_decode_and_prefill` over the paged cache: both launch `kernels/attention.cu`.

use attention_core::inference::{FlashDecode, StaticDecodeStep};
use attention_core::sdpa::PlainSdpa;
use attention_spec::ForwardError;
use attention_spec::module::{CoreAttention, CoreAttentionInput, PagedKv};
use tch::{Kind, Tensor};

use crate::Error;
pub use crate::KernelPath;
use crate::launch::{
    Geometry, Params, append, check_head_dim, check_tensor, cuda_index, dtype_name, launch,
    scale_log2, tensor_cores_apply,
};

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
    PROMPT_ROUTE_MIN_TOKENS * 128 / hd.max(1)
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
/// longest prompt (the flash forward covers that many tokens of each). The other paths always
/// run our kernel over the whole step.
#[derive(Debug, Clone, Copy)]
pub struct CudaPagedAttention {
    scale: f64,
    path: KernelPath,
    programmatic: bool,
}

impl CudaPagedAttention {
    /// With a softmax scale, on [`KernelPath::Auto`], with programmatic dependent launch.
    pub fn new(scale: f64) -> Self {
        Self { scale, path: KernelPath::Auto, programmatic: true }
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
        let routed = paged.prompt_tail.filter(|tail| {
            self.path == KernelPath::Auto
                && tensor_cores_apply(kind, hd)
                && t - tail.token >= prompt_route_min_tokens(hd)
        });
        let Some(tail) = routed else {
            let out = empty()?;
            launch(
                true,
                self.path,
                kind,
                hd,
                ordinal,
                Params { out: out.data_ptr() as u64, ..p },
                geo,
            )?;
            return Ok(out);
        };
        // The tail's prompts through libtorch first: a failed call leaves the cache as it was.
        let (r0, t0) = (tail.request, tail.token);
        let tt = t - t0;
        let cu_tail = if r0 == 0 {
            paged.cu_seqlens_q.shallow_clone()
        } else {
            paged.cu_seqlens_q.f_narrow(0, r0, n - r0 + 1)?.f_sub_scalar(t0)?
        };
        let part = |x: &Tensor| x.f_narrow(0, t0, tt);
        let (q, k, v) = (part(input.query)?, part(input.key)?, part(input.value)?);
        let shape = [n - r0, np, ngp, hd];
        let attended =
            tch::no_grad(|| self.prompts((&q, &k, &v), &cu_tail, paged.max_seqlen_q, shape))?;
        // The head (decode tokens, continued chunks) through our kernel, which appends it.
        let out = if t0 > 0 { Some(empty()?) } else { None };
        if let Some(out) = &out {
            let p = Params { out: out.data_ptr() as u64, ..p };
            let head = Geometry {
                n_rows: r0,
                max_q: tail.head_max_seqlen_q,
                max_keys: tail.head_max_seqlen_k,
                capacity: tail.head_max_seqlen_k,
                total_tokens: t0,
                ..geo
            };
            launch(true, self.path, kind, hd, ordinal, p, head)?;
        }
        // The tail's append: its rows of the inputs, lengths and block table.
        let row = (ngp * hd * kind.elt_size_in_bytes() as i64) as u64;
        let appended = Params {
            k_new: p.k_new + t0 as u64 * row,
            v_new: p.v_new + t0 as u64 * row,
            cu_q: cu_tail.data_ptr() as u64,
            kv_len: p.kv_len + 4 * r0 as u64,
            block_table: p.block_table + 4 * (r0 * bt[1]) as u64,
            ..p
        };
        append(kind, hd, ordinal, appended, (n - r0, ngp, tt))?;
        let Some(out) = out else { return Ok(attended) };
        out.f_narrow(0, t0, tt)?.f_copy_(&attended)?;
        Ok(out)
    }
}

impl CudaPagedAttention {
    /// Causal attention of prompts over their own keys and values (see the type's
    /// documentation): `q` `[tt, 1, np, hd]`, `k`, `v` `[tt, 1, ngp, hd]`, `cu` the `n + 1`
    /// prompts' offsets in them, `max_q` at least the longest; out `[tt, 1, np * hd]`.
    fn prompts(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        cu: &Tensor,
        max_q: i64,
        [n, np, ngp, hd]: [i64; 4],
    ) -> Result<Tensor, Error> {
        let tt = q.size()[0];
        if n == 1 {
            let call = PlainSdpa { causal: true, scale: self.scale, dropout: 0.0, gqa: np != ngp };
            return crate::shim::sdpa_sbhd(q, k, v, LIBTORCH_CHOICE, &call);
        }
        let [out, ..] = crate::shim::flash_varlen_forward(
            &q.f_view([tt, np, hd])?,
            &k.f_view([tt, ngp, hd])?,
            &v.f_view([tt, ngp, hd])?,
            cu,
            cu,
            max_q,
            max_q,
            0.0,
            true,
            self.scale,
        )?;
        Ok(out.f_view([tt, 1, np * hd])?)
    }
}

/// `sdpa_sbhd`'s backend code for "`scaled_dot_product_attention`, libtorch's choice".
const LIBTORCH_CHOICE: i64 = -1;

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
