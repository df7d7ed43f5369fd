//! Inference contexts for the attention crates: Megatron's static KV cache
//! (`StaticInferenceContext`) and the paged, dynamic-batching cache
//! (`DynamicInferenceContext`).
//!
//! Status: not written yet; this crate currently holds only its place in the workspace and its
//! feature wiring.
//!
//! # Other crates
//!
//! Depends on `attention-spec` and `attention-core`; never on `attention-cuda` (fast paths are
//! reached through the registry).
//!
//! # Feature flags
//!
//! * `cuda` (off by default): forwards to `attention-core/cuda` (CUDA variants of the
//!   device-generic tests).
