//! CUDA fast paths for the attention crates.
//!
//! * `flash_decode` over the static KV cache ([`decode::CudaFlashDecode`], plugged into
//!   `attention_inference::StaticInferenceContext::set_flash_decode`): one kernel rotates the
//!   query and the new key at each row's offset (offsets are a device tensor), appends the new
//!   key and value to the cache and attends over the cached prefix, with split-KV and each
//!   key/value head read once per query group; a second small kernel merges the splits.
//! * `paged-attention-cuda` ([`decode::CudaPagedAttention`]): `flash_decode_and_prefill` over the
//!   paged cache — decode tokens and chunked-prefill tokens of many requests in one launch, any
//!   block size, bottom-right causal, GQA-aware, split-KV, appending the step's keys and values.
//!   A step's long trailing prompts without cached keys go to libtorch's fused kernels on the
//!   inputs, with only their append ours; a long prompt chunk over cached keys goes to cuDNN
//!   twice (over its gathered cached keys, and causally over its own), merged by a kernel of
//!   ours. Select it with `DynamicContextOptions::paged_attention`; its params
//!   (`DynamicContextOptions::paged_attention_params`) are `kernel` ([`KernelPath`]) and the
//!   routes' thresholds `prompt_route_min_tokens` and `chunk_route_min_flop` (see
//!   [`decode::CudaPagedAttention::with_route_thresholds`]; 0 routes every one).
//! * `sdpa-cuda` ([`sdpa::SdpaCuda`]): the SDPA core attention with the backend set from the spec
//!   (`params = { backend = "cudnn" | "flash" | "efficient" | "math" | "auto" }`) and reported,
//!   and packed THD sequences through libtorch's variable-length flash attention (forward and
//!   backward).
//!
//! * [`graph::CudaGraph`]: CUDA-graph capture and replay of libtorch work (a decode step with
//!   its `flash_decode` kernels), through libtorch's own `CUDAGraph`.
//!
//! Kernels are CUDA C++ (`kernels/attention.cu`), compiled with NVRTC at run time for the
//! device's architecture and launched through the CUDA driver API (cudarc, loaded dynamically)
//! on libtorch's current stream. A small C++ shim (`shim/cuda_shim.cpp`) reaches the libtorch
//! APIs tch does not bind. See [`runtime`] for where NVRTC and the headers are found.
//!
//! # Other crates
//!
//! Depends on `attention-spec` and `attention-core`. Nothing library-side depends on it:
//! binaries and tests name it ([`link`]) so its kinds are registered.
//!
//! # Feature flags
//!
//! * `cuda` (off by default): the CUDA code. Without it the crate builds on any machine with no
//!   CUDA toolkit, its kinds are still registered (so specs naming them resolve) but refuse to
//!   build, and [`require_cuda`] returns [`Error::NotCompiledWithCuda`].
// Without the feature the CUDA modules do not exist: their links above point here.
#![cfg_attr(not(feature = "cuda"), doc = "")]
#![cfg_attr(not(feature = "cuda"), doc = "[`decode::CudaFlashDecode`]: #feature-flags")]
#![cfg_attr(not(feature = "cuda"), doc = "[`decode::CudaPagedAttention`]: #feature-flags")]
#![cfg_attr(
    not(feature = "cuda"),
    doc = "[`decode::CudaPagedAttention::with_route_thresholds`]: #feature-flags"
)]
#![cfg_attr(not(feature = "cuda"), doc = "[`graph::CudaGraph`]: #feature-flags")]
#![cfg_attr(not(feature = "cuda"), doc = "[`runtime`]: #feature-flags")]

use attention_spec::ForwardError;
use tch::Device;

#[cfg(feature = "cuda")]
pub mod decode;
#[cfg(feature = "cuda")]
pub mod graph;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod sdpa;
#[cfg(feature = "cuda")]
#[expect(
    unsafe_code,
    reason = "FFI to shim/cuda_shim.cpp; each unsafe block states its safety argument"
)]
pub mod shim;

/// Why a CUDA path cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The crate was built without the `cuda` feature.
    #[error("attention-cuda was built without the `cuda` feature")]
    NotCompiledWithCuda,
    /// The device is not a CUDA device, or libtorch sees no such CUDA device.
    #[error("{device:?} is not an available CUDA device (libtorch sees {available} CUDA devices)")]
    NoDevice {
        /// The device asked for.
        device: Device,
        /// How many CUDA devices libtorch sees.
        available: i64,
    },
    /// NVRTC, the CUDA headers or the driver library could not be found or loaded.
    #[error("CUDA toolkit: {0}")]
    Toolkit(String),
    /// NVRTC rejected the kernels.
    #[error("kernel compilation: {0}")]
    Compile(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// Valid input the kernels do not handle (head dimension, dtype, sizes).
    #[error("not supported by the CUDA kernels: {0}")]
    Unsupported(String),
    /// Inconsistent input (shapes, devices, contiguity).
    #[error("{0}")]
    Input(String),
    /// libtorch raised an error.
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Self::Torch(e.to_string())
    }
}

impl From<Error> for ForwardError {
    fn from(e: Error) -> Self {
        match e {
            Error::Unsupported(what) => {
                ForwardError::Unsupported { module: "attention-cuda", what }
            }
            Error::Input(reason) => ForwardError::Invalid { name: "attention-cuda input", reason },
            other => ForwardError::Context(Box::new(other)),
        }
    }
}

/// Checks that CUDA paths can run on `device`: the crate has the `cuda` feature and libtorch
/// sees that CUDA device.
pub fn require_cuda(device: Device) -> Result<(), Error> {
    if !cfg!(feature = "cuda") {
        return Err(Error::NotCompiledWithCuda);
    }
    let available = tch::Cuda::device_count();
    match device {
        Device::Cuda(i) if (i as i64) < available => Ok(()),
        _ => Err(Error::NoDevice { device, available }),
    }
}

/// Which of the two attention kernels a `flash_decode` or `paged-attention-cuda` call runs.
///
/// As the `paged-attention-cuda` kind's params: `kernel = "auto" | "cuda-cores" |
/// "tensor-cores"` (for a dynamic context, in `DynamicContextOptions::paged_attention_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelPath {
    /// Tensor cores where they apply (bf16/f16, head dimension 32, 64 or 128) and a block has
    /// more than one query row per key/value head (GQA, or several new tokens), or for
    /// `flash_decode` at head dimension 128 whatever the grouping; otherwise CUDA cores.
    #[default]
    Auto,
    /// fp32 dot products on the CUDA cores: every dtype and head dimension.
    CudaCores,
    /// m16n8k16 MMAs on the tensor cores; [`Error::Unsupported`] for fp32 or head dimension 256.
    TensorCores,
}

/// Head dimensions the `flash_decode` and `paged-attention-cuda` kernels are built for.
pub const KERNEL_HEAD_DIMS: [i64; 4] = [32, 64, 128, 256];

/// The kinds this crate registers.
pub const BUILTIN_KINDS: &[&str] = &["paged-attention-cuda", "sdpa-cuda"];

/// Makes sure this crate, and so its kind registrations, is linked into the binary.
pub fn link() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_never_a_cuda_device() {
        assert!(require_cuda(Device::Cpu).is_err());
        if !cfg!(feature = "cuda") {
            assert!(matches!(require_cuda(Device::Cuda(0)), Err(Error::NotCompiledWithCuda)));
        }
    }
}
