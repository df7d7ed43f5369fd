//! The module roles a spec slot can hold, as object-safe traits, with the inputs their
//! forwards take and the error they return.
//!
//! Implementations live in other crates (`attention-core`, `attention-inference`,
//! `attention-cuda`) and register themselves in the [`registry`](crate::registry). The traits
//! live here because the registry's entries build them.
//!
//! Layout convention (Megatron's, used throughout the workspace): activations are
//! sequence-first, `[s, b, h]`; per-head tensors are `[s, b, heads, head_dim]`. Packed (THD)
//! sequences use `b = 1` and [`PackedSeqParams`].

use std::fmt;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Megatron's `AttnMaskType`, the mask a core attention is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnMaskType {
    /// A caller-supplied mask (Megatron's default for `SelfAttention`).
    Padding,
    /// Lower-triangular; built by the core attention when no mask is given and `sq > 1`.
    Causal,
    /// No mask.
    NoMask,
    /// Padding and causal (THD packed sequences).
    PaddingCausal,
    /// Any caller-supplied mask.
    Arbitrary,
}

impl AttnMaskType {
    /// The name used in TOML and fixtures.
    pub fn name(self) -> &'static str {
        match self {
            Self::Padding => "padding",
            Self::Causal => "causal",
            Self::NoMask => "no_mask",
            Self::PaddingCausal => "padding_causal",
            Self::Arbitrary => "arbitrary",
        }
    }
}

impl fmt::Display for AttnMaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a core attention serves a self or a cross attention (Megatron `attention_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionType {
    /// Keys and values come from the same sequence as the queries.
    SelfAttention,
    /// Keys and values come from `key_value_states`.
    CrossAttention,
}

/// Packed variable-length sequences in THD layout (Megatron `PackedSeqParams` with
/// `qkv_format = "thd"`): the batch dimension is 1 and sequence `i` occupies tokens
/// `cu_seqlens[i]..cu_seqlens[i+1]`. Tokens of different sequences never attend to each other.
#[derive(Debug)]
pub struct PackedSeqParams {
    /// Cumulative query lengths, int32 or int64 `[n + 1]`, starting at 0.
    pub cu_seqlens_q: Tensor,
    /// Cumulative key/value lengths, `[n + 1]`.
    pub cu_seqlens_kv: Tensor,
    /// Longest query sequence.
    pub max_seqlen_q: i64,
    /// Longest key/value sequence.
    pub max_seqlen_kv: i64,
}

impl PackedSeqParams {
    /// Packed self-attention sequences of the given lengths (same for queries and keys).
    pub fn from_lengths(lengths: &[i64], device: Device) -> Self {
        let mut cu = Vec::with_capacity(lengths.len() + 1);
        cu.push(0i64);
        for l in lengths {
            cu.push(cu.last().copied().unwrap_or(0) + l);
        }
        let max = lengths.iter().copied().max().unwrap_or(0);
        let t = Tensor::from_slice(&cu).to_device(device);
        Self {
            cu_seqlens_q: t.shallow_clone(),
            cu_seqlens_kv: t,
            max_seqlen_q: max,
            max_seqlen_kv: max,
        }
    }
}

/// Inputs of a core attention call.
#[derive(Debug, Clone, Copy)]
pub struct CoreAttentionInput<'a> {
    /// `[sq, b, np, hn]`.
    pub query: &'a Tensor,
    /// `[sk, b, ngp, hn]`.
    pub key: &'a Tensor,
    /// `[sk, b, ngp, hn]`.
    pub value: &'a Tensor,
    /// Boolean, `true` = masked out; broadcastable to `[b, np, sq, sk]`.
    pub attention_mask: Option<&'a Tensor>,
    /// The caller's mask type (Megatron's local attention ignores it and uses its own).
    pub attn_mask_type: AttnMaskType,
    /// Added to the scaled scores before the softmax (TE's `post_scale_bias`);
    /// broadcastable to `[b, np, sq, sk]`.
    pub attention_bias: Option<&'a Tensor>,
    /// Packed THD sequences (then `b = 1`).
    pub packed_seq_params: Option<&'a PackedSeqParams>,
    /// Training mode: attention dropout is applied.
    pub training: bool,
}

impl<'a> CoreAttentionInput<'a> {
    /// Queries, keys and values with a mask type; no mask tensor, bias or packing, eval mode.
    pub fn new(
        query: &'a Tensor,
        key: &'a Tensor,
        value: &'a Tensor,
        attn_mask_type: AttnMaskType,
    ) -> Self {
        Self {
            query,
            key,
            value,
            attention_mask: None,
            attn_mask_type,
            attention_bias: None,
            packed_seq_params: None,
            training: false,
        }
    }
}

/// What went wrong in a forward: bad input caught before any kernel ran, or libtorch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// A tensor has the wrong shape.
    #[error("{name}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which input.
        name: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The actual shape.
        got: Vec<i64>,
    },
    /// A tensor has the wrong element type.
    #[error("{name}: expected dtype {expected}, got {got:?}")]
    Dtype {
        /// Which input.
        name: &'static str,
        /// The expected dtype(s), in words.
        expected: String,
        /// The actual dtype.
        got: Kind,
    },
    /// A tensor is on the wrong device.
    #[error("{name}: expected device {expected:?}, got {got:?}")]
    Device {
        /// Which input.
        name: &'static str,
        /// The module's device.
        expected: Device,
        /// The tensor's device.
        got: Device,
    },
    /// An input is inconsistent in another way.
    #[error("{name}: {reason}")]
    Invalid {
        /// Which input.
        name: &'static str,
        /// What is wrong, with values.
        reason: String,
    },
    /// A valid request this module does not support.
    #[error("not supported by {module}: {what}")]
    Unsupported {
        /// The module kind.
        module: &'static str,
        /// What.
        what: String,
    },
    /// An inference context refused the step (a sequence or batch limit, exhausted KV blocks,
    /// a layer it does not hold); the boxed error is the context's own typed error.
    #[error("inference context: {0}")]
    Context(Box<dyn std::error::Error + Send + Sync>),
    /// libtorch raised an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A linear layer in a `linear_*` slot (Megatron `ColumnParallelLinear`/`RowParallelLinear`).
pub trait Linear: fmt::Debug + Send {
    /// The registered kind.
    fn kind(&self) -> &'static str;
    /// `[.., in] -> [.., out]`. Returns the bias separately (not added) when the layer was
    /// built with `skip_bias_add`, as Megatron's `(output, output_bias)`.
    fn forward(&self, input: &Tensor) -> Result<(Tensor, Option<Tensor>), ForwardError>;
    /// The weight, `[out, in]`.
    fn weight(&self) -> &Tensor;
    /// The bias, `[out]`, if any.
    fn bias(&self) -> Option<&Tensor>;
    /// Delayed weight gradients (`delay_wgrad_compute`): computes and accumulates into
    /// `weight.grad` (and `bias.grad`) the weight gradients of every backward pass that ran since
    /// the last call, and returns how many it processed. With nothing pending (or a layer that
    /// computes weight gradients in its backward) it does nothing and returns 0.
    fn backward_dw(&self) -> Result<usize, ForwardError> {
        Ok(0)
    }
    /// Backward passes whose weight gradients wait for [`backward_dw`](Self::backward_dw).
    fn pending_wgrads(&self) -> usize {
        0
    }
}

/// A norm in a `q_layernorm`/`k_layernorm` slot, applied over the last dimension.
pub trait Norm: fmt::Debug + Send {
    /// The registered kind.
    fn kind(&self) -> &'static str;
    /// Normalizes the last dimension; the output has the input's shape and dtype.
    fn forward(&self, input: &Tensor) -> Result<Tensor, ForwardError>;
    /// True for the identity (no norm), which Megatron represents as `None`.
    fn is_identity(&self) -> bool {
        false
    }
    /// The norm's parameters by name (`weight`, `bias`).
    fn parameters(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }
}

/// A core attention in the `core_attention` slot (Megatron `DotProductAttention`). It is
/// `Sync`: selective recompute calls it again from the autograd engine during backward.
pub trait CoreAttention: fmt::Debug + Send + Sync {
    /// The registered kind.
    fn kind(&self) -> &'static str;
    /// Attention of `input.query` over `input.key`/`input.value`.
    ///
    /// # Shapes
    /// query `[sq, b, np, hn]`, key and value `[sk, b, ngp, hn]` with `np % ngp == 0`
    /// (query head `n` uses key/value head `n / (np / ngp)`); output `[sq, b, np * hn]`.
    fn forward(&self, input: &CoreAttentionInput<'_>) -> Result<Tensor, ForwardError>;

    /// Attention over paged key/value memory (Megatron's `flash_decode_and_prefill`): appends
    /// `input.key`/`input.value` (`[T, 1, ngp, hn]`, the step's new tokens, already rotated)
    /// at `paged.slot_mapping`, then attends `input.query` (`[T, 1, np, hn]`, requests laid out
    /// by `paged.cu_seqlens_q`) over each request's cached tokens with a bottom-right aligned
    /// causal mask. Output `[T, 1, np * hn]`. Kinds without a paged path refuse.
    fn forward_paged(
        &self,
        input: &CoreAttentionInput<'_>,
        paged: &PagedKv<'_>,
    ) -> Result<Tensor, ForwardError> {
        let _ = (input, paged);
        Err(ForwardError::Unsupported {
            module: self.kind(),
            what: "paged key/value memory".into(),
        })
    }

    /// QK-Clip: per-head maxima `[np]` of the masked, scaled logits of the training forwards
    /// since the last [`reset_max_attention_logits`](Self::reset_max_attention_logits), when the
    /// config asks for them (`qk_clip` or `log_max_attention_logit`); `None` otherwise.
    fn max_attention_logits(&self) -> Option<Tensor> {
        None
    }

    /// Forgets the recorded maxima.
    fn reset_max_attention_logits(&self) {}

    /// The kernel backend the last call ran, when the kind can tell (e.g. `cudnn`, `flash`).
    fn backend(&self) -> Option<String> {
        None
    }
}

/// Paged key/value memory of one layer and the step's metadata (see
/// [`CoreAttention::forward_paged`]).
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// `[num_blocks, block_size, ngp, hn]`, written in place.
    pub key_cache: &'a Tensor,
    /// `[num_blocks, block_size, ngp, hn]`, written in place.
    pub value_cache: &'a Tensor,
    /// int64 `[T]`: `block * block_size + offset` of each new token.
    pub slot_mapping: &'a Tensor,
    /// int32 `[n, max_blocks]`: each request's blocks in order, padded with -1.
    pub block_table: &'a Tensor,
    /// int32 `[n + 1]`: the requests' query tokens, cumulative.
    pub cu_seqlens_q: &'a Tensor,
    /// int32 `[n]`: each request's keys after the append (cached + new).
    pub seqlens_k: &'a Tensor,
    /// Longest query run.
    pub max_seqlen_q: i64,
    /// Longest key run.
    pub max_seqlen_k: i64,
    /// The step's last requests that have no keys cached before it (prompts' first chunks), if
    /// any: their keys are their own new tokens, so a kernel can attend over the inputs without
    /// reading the pages back. A promise from the host, which knows it; implementations that
    /// read the lengths refuse a false one, others would leave cached keys out. `None` is
    /// always correct.
    pub prompt_tail: Option<PromptTail>,
    /// The prompt chunk that ends the step's head (the request just before the prompt tail, or
    /// the step's last request without one) when its request already has keys cached: a
    /// prompt's later chunk, with its lengths from the host, so that a kernel can attend it
    /// over a contiguous copy of its cached keys. A promise like `prompt_tail`; `None` is
    /// always correct.
    pub continued_chunk: Option<ContinuedChunk>,
}

/// Where a paged step's trailing prompts without cached keys start ([`PagedKv::prompt_tail`]):
/// requests `request..n`, whose query tokens start at `token` (`cu_seqlens_q[request]`), each
/// have `seqlens_k` equal to their query tokens. The requests before them (the head: decode
/// tokens, continued chunks) may have any; `head_max_seqlen_q` and `head_max_seqlen_k` bound
/// their runs as `max_seqlen_q` and `max_seqlen_k` bound the whole step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptTail {
    /// The first request of the tail.
    pub request: i64,
    /// Its first query token.
    pub token: i64,
    /// Longest query run among the head's requests.
    pub head_max_seqlen_q: i64,
    /// Longest key run among the head's requests.
    pub head_max_seqlen_k: i64,
}

/// A paged step's prompt chunk over cached keys ([`PagedKv::continued_chunk`]): request
/// `request`, the last one before the prompt tail (or the step's last), has `tokens` query
/// tokens from `token` (`cu_seqlens_q[request]`) and `cached + tokens` keys (`seqlens_k`), with
/// `cached >= 1`. `before_max_seqlen_q` and `before_max_seqlen_k` bound the runs of the requests
/// before it as `max_seqlen_q` and `max_seqlen_k` bound the whole step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContinuedChunk {
    /// The chunk's request.
    pub request: i64,
    /// Its first query token.
    pub token: i64,
    /// Its query tokens (new keys).
    pub tokens: i64,
    /// Its keys cached before the step.
    pub cached: i64,
    /// Longest query run among the requests before it.
    pub before_max_seqlen_q: i64,
    /// Longest key run among the requests before it.
    pub before_max_seqlen_k: i64,
}

impl PromptTail {
    /// A step of prompts only: every request is in the tail.
    pub const ALL: PromptTail =
        PromptTail { request: 0, token: 0, head_max_seqlen_q: 0, head_max_seqlen_k: 0 };
}
