//! Inference contexts for the attention crates: Megatron's static KV cache
//! ([`StaticInferenceContext`]) and the paged, dynamic-batching cache
//! ([`DynamicInferenceContext`]), with the CPU reference of the paged attention
//! ([`paged::PagedAttention`], kind `paged-attention`).
//!
//! Both implement `attention_core::inference::InferenceContext`; a layer runs in one with
//! `SelfAttention::forward_with_context`.
//!
//! # Other crates
//!
//! Depends on `attention-spec` and `attention-core`; never on `attention-cuda` (fast paths are
//! reached through the registry: the paged context runs whichever core-attention kind its
//! options name).
//!
//! # Feature flags
//!
//! * `cuda` (off by default): forwards to `attention-core/cuda` (CUDA variants of the
//!   device-generic tests).

pub mod allocator;
pub mod dynamic;
pub mod error;
pub mod paged;
pub mod static_context;

pub use allocator::BlockAllocator;
pub use dynamic::{
    DynamicContextOptions, DynamicInferenceContext, KvMemory, StepEntry, StepMetadata, StepPlan,
};
pub use error::{InferenceError, RequestId};
pub use static_context::StaticInferenceContext;

/// The kinds this crate registers.
pub const BUILTIN_KINDS: &[&str] = &["paged-attention"];

/// Makes sure this crate, and so its kind registrations, is linked into the binary.
pub fn link() {}
