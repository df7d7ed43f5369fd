//! Megatron-Core's attention on libtorch: `SelfAttention` and `CrossAttention` with the same
//! semantics, parameter names and layouts as Megatron-Core 0.19.2, forward and backward on CPU
//! and GPU.
//!
//! The modules are built from a spec resolved by `attention-spec`; every slot implementation
//! here registers itself under a stable kind:
//!
//! | kind | module |
//! |---|---|
//! | `column-parallel-linear`, `row-parallel-linear` | [`linear::ParallelLinear`] |
//! | `dot-product-attention` | [`dot_product::DotProductAttention`] |
//! | `sdpa` | [`sdpa::SdpaAttention`] |
//! | `torch-norm`, `layer-norm`, `rms-norm`, `l2-norm`, `identity` | [`norm`] |
//!
//! ```
//! # fn main() -> anyhow::Result<()> {
//! use attention_core::{Attention, AttentionInput};
//! use attention_spec::Model;
//! let model = Model::from_toml_str(
//!     "[transformer]\nhidden_size = 64\nnum_attention_heads = 4\nattention_dropout = 0.0\n",
//!     attention_core::registry()?,
//! )?;
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let layer = &model.layers[0];
//! let attn = Attention::build(&vs.root(), &model.config, &layer.attention, layer.layer_number)?;
//! let x = tch::Tensor::randn([5, 2, 64], (tch::Kind::Float, tch::Device::Cpu));
//! let out = attn.forward(&AttentionInput::new(&x))?;
//! assert_eq!(out.output.size(), [5, 2, 64]);
//! assert_eq!(out.bias.map(|b| b.size()), Some(vec![64]));
//! # Ok(())
//! # }
//! ```
//!
//! Activations are sequence-first `[s, b, h]` throughout (see [`attention`]).
//!
//! Training extras: selective recompute of core attention ([`recompute`], on with
//! `recompute_granularity = "selective"`), delayed weight gradients (`delay_wgrad_compute`,
//! [`SelfAttention::backward_dw`]), QK-Clip ([`SelfAttention::clip_qk`], [`training`]),
//! realtime consistency checks ([`SelfAttention::run_realtime_tests`]). They rest on
//! [`autograd`], which runs Rust code as libtorch autograd functions through a small C++ shim.
//!
//! # Other crates
//!
//! * `attention-spec`: configs, specs, the registry and the module traits implemented here.
//! * `attention-inference`: static and paged KV-cache contexts for these modules.
//! * `attention-cuda`: CUDA fast paths (feature `cuda`).
//!
//! # Feature flags
//!
//! * `cuda` (off by default): compiles the CUDA variants of the device-generic tests. The
//!   modules themselves run on any libtorch device without it.

pub mod attention;
#[expect(
    unsafe_code,
    reason = "FFI to the C++ shim (shim/shim.cpp); each unsafe block states its safety argument"
)]
pub mod autograd;
pub mod check;
pub mod convert;
pub mod dot_product;
pub mod inference;
pub mod linear;
pub mod mask;
pub mod model;
pub mod norm;
pub mod recompute;
pub mod rotary;
pub mod sdpa;
pub mod training;
pub mod weights;

pub use attention::{
    Attention, AttentionInput, AttentionOutput, CrossAttention, RotaryPosEmb, SelfAttention,
};
pub use model::BuiltLayers;
pub use rotary::RotaryEmbedding;

use attention_spec::{Registry, SpecError};

/// The kinds this crate registers.
pub const BUILTIN_KINDS: &[&str] = &[
    "column-parallel-linear",
    "row-parallel-linear",
    "dot-product-attention",
    "sdpa",
    "torch-norm",
    "layer-norm",
    "rms-norm",
    "l2-norm",
    "identity",
];

/// The global registry (every kind linked into this binary). Calling it also makes sure this
/// crate, and so its registrations, is linked.
pub fn registry() -> Result<&'static Registry, SpecError> {
    Registry::global()
}
