//! Model configs and module specs for Megatron-Core attention in Rust.
//!
//! This crate reads TOML model files whose `[transformer]` table uses Megatron-Core
//! `TransformerConfig` field names and defaults ([`config`]), describes the attention's
//! submodules as a `ModuleSpec` tree with presets ([`spec`]), and resolves that tree against a
//! registry of module kinds ([`registry`]) that implementations fill with `inventory`. It does
//! no tensor math: it defines the roles a slot can hold ([`module`]) and the error types.
//!
//! ```
//! # fn main() -> Result<(), attention_spec::SpecError> {
//! use attention_spec::{ModelSpec, Registry};
//! let spec = ModelSpec::from_toml_str(
//!     "[transformer]\nhidden_size = 256\nnum_attention_heads = 8\nnum_query_groups = 2\n",
//! )?;
//! let t = spec.transformer.as_ref().map(|t| t.resolve(&Default::default(), 0)).transpose()?;
//! assert_eq!(t.map(|t| t.kv_channels), Some(32));
//! // Resolving the attention needs the kinds registered by attention-core:
//! assert!(spec.resolve(&Registry::empty()).is_err());
//! # Ok(())
//! # }
//! ```
//!
//! # Other crates
//!
//! * `attention-core`: the modules (linears, norms, rotary, core attentions, `SelfAttention`,
//!   `CrossAttention`), registered here under their kinds.
//! * `attention-inference`: static and paged KV-cache inference contexts.
//! * `attention-cuda`: CUDA fast paths (feature `cuda`).
//! * `attention-cli`: the `attn` binary.
//!
//! # Feature flags
//!
//! None: this crate is always CPU-only data plus the registry.

pub mod config;
pub mod error;
pub mod file;
pub mod module;
pub mod registry;
pub mod spec;

pub use config::{TransformerConfig, TransformerConfigSpec};
pub use error::{Place, SpecError};
pub use file::{Layer, Model, ModelSpec};
pub use module::{AttnMaskType, ForwardError};
pub use registry::{ModuleFactory, Registry, Role};
pub use spec::{AttentionSpec, ResolvedAttention};
