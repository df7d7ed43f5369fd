//! CUDA fast paths for the attention crates.
//!
//! Status: this crate holds the plumbing so far — the `cuda` feature, its forwarding to
//! `attention-core`, and the device check every CUDA entry point starts with. The fused
//! kernels (`flash_decode`, paged `flash_decode_and_prefill`) and the libtorch shim for varlen
//! flash attention and SDPA backend selection are not written yet. Prefill and training on a
//! GPU already run through `attention-core`'s `sdpa` kind, which dispatches to libtorch's
//! cuDNN and flash kernels.
//!
//! # Other crates
//!
//! Depends on `attention-spec` and `attention-core`. Nothing library-side depends on it:
//! binaries and tests name it.
//!
//! # Feature flags
//!
//! * `cuda` (off by default): CUDA code. Without it the crate builds on any machine, with no
//!   CUDA toolkit, and [`require_cuda`] returns [`Error::NotCompiledWithCuda`].

use tch::Device;

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
