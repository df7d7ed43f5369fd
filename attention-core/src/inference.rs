//! The hook inference contexts implement (Megatron's `BaseInferenceContext` plus the part of
//! `_adjust_key_value_for_inference` and the core-attention call that depends on the context).
//!
//! [`SelfAttention::forward_with_context`](crate::SelfAttention::forward_with_context) computes
//! the projections and Q/K norms, hands query, key and value (not yet rotated) to the context,
//! and applies `linear_proj` to what the context returns. The context stores the new keys and
//! values, applies rotary embeddings as its cache layout requires, and runs the attention over
//! the cached prefix: the static context with the layer's own core attention, the paged
//! context with its paged kernel. `attention-inference` implements both.

use attention_spec::{AttnMaskType, ForwardError, TransformerConfig};
use tch::Tensor;

use crate::attention::AttentionInput;
use attention_spec::module::CoreAttention;

/// What a context learns about the layer that calls it.
#[derive(Debug, Clone, Copy)]
pub struct LayerContext<'a> {
    /// Global 1-based layer number.
    pub layer_number: i64,
    /// The layer's config.
    pub config: &'a TransformerConfig,
    /// The layer's core attention (used by contexts that attend densely).
    pub core_attention: &'a dyn CoreAttention,
    /// The mask type the layer was built with.
    pub attn_mask_type: AttnMaskType,
}

/// Query, key and value of one layer, after Q/K norms, before rotary.
#[derive(Debug)]
pub struct Qkv {
    /// `[s, b, np, hn]`.
    pub query: Tensor,
    /// `[s, b, ngp, hn]`.
    pub key: Tensor,
    /// `[s, b, ngp, hn]`.
    pub value: Tensor,
}

/// A KV-cache context an attention forward runs in.
pub trait InferenceContext {
    /// Stores the new keys and values of `layer`, and returns the core-attention output over
    /// the cached prefix plus the new tokens, `[s, b, np * hn]`. `input` carries the rotary
    /// table (covering every position the step touches) and an optional attention mask.
    ///
    /// A call that fails leaves the context's caches and bookkeeping as they were.
    fn attend(
        &mut self,
        layer: &LayerContext<'_>,
        qkv: Qkv,
        input: &AttentionInput<'_>,
    ) -> Result<Tensor, ForwardError>;
}

/// `cos` and `sin` `[max_seq, rot_dim / 2]` (fp32) of a rotary table, and its layout.
#[derive(Debug, Clone, Copy)]
pub struct RotaryCosSin<'a> {
    /// `cos(position * inv_freq)`.
    pub cos: &'a Tensor,
    /// `sin(position * inv_freq)`.
    pub sin: &'a Tensor,
    /// Interleaved pairs instead of rotate-half.
    pub interleaved: bool,
}

/// One decode step over a static cache, for a fused kernel (Megatron's `flash_decode`).
#[derive(Debug, Clone, Copy)]
pub struct StaticDecodeStep<'a> {
    /// `[1, b, np, hn]`, not rotated.
    pub query: &'a Tensor,
    /// `[1, b, ngp, hn]`, not rotated: written to the cache at each row's offset.
    pub key: &'a Tensor,
    /// `[1, b, ngp, hn]`.
    pub value: &'a Tensor,
    /// `[max_seq, max_batch, ngp, hn]`, rotated keys.
    pub key_cache: &'a Tensor,
    /// `[max_seq, max_batch, ngp, hn]`.
    pub value_cache: &'a Tensor,
    /// First batch row of the step in the cache.
    pub batch_offset: i64,
    /// int32 `[b]` on the device: tokens cached per row (the new token's position). A device
    /// tensor, so a captured step replays with new offsets.
    pub sequence_offsets: &'a Tensor,
    /// The largest of `sequence_offsets`, where the host knows it (`None`: the cache's
    /// length). Only sizes the launch (a kernel splits the keys it expects); a bound below a
    /// row's offset costs speed, never keys.
    pub max_sequence_offset: Option<i64>,
    /// Rotary for the query and the new key, if any.
    pub rotary: Option<RotaryCosSin<'a>>,
    /// Softmax scale.
    pub softmax_scale: f64,
}

/// A fused static-cache decode kernel: rotary of the query and the new key at each row's
/// offset, the append of the new key and value, and attention over the cached prefix.
pub trait FlashDecode: std::fmt::Debug + Send + Sync {
    /// Output `[1, b, np * hn]`.
    fn flash_decode(&self, step: &StaticDecodeStep<'_>) -> Result<Tensor, ForwardError>;
}
