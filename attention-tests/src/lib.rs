//! Parity fixtures against Megatron-Core and the cross-crate test suite of the attention crates.
//!
//! * [`parity`]: runs fixture cases written by `tools/megatron-golden` (Megatron-Core 0.19.2
//!   itself) through the project's spec machinery and modules, and compares every tensor. The
//!   `attn parity` command and the `parity` test use it.
//! * [`assert_close`]: the one tolerance check the tests use.
//!
//! Fixtures live in `attention-tests/fixtures/`; [`fixtures_dir`] finds them.
//!
//! # Other crates
//!
//! It depends on every library crate: `attention-spec`, `attention-core`,
//! `attention-inference` and `attention-cuda`.
//!
//! # Feature flags
//!
//! * `cuda` (off by default): also run the device-generic tests on CUDA (needs a GPU).

pub mod parity;

use std::path::PathBuf;

use anyhow::{Result, bail};
use tch::{Device, Kind, Tensor};

/// `attention-tests/fixtures`: `$ATTENTION_TESTS_FIXTURES` if set, else the crate's folder
/// when it exists (a test binary run where it was built), else `attention-tests/fixtures` under
/// the current directory (a test binary copied to another machine and run from a checkout).
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATTENTION_TESTS_FIXTURES") {
        return PathBuf::from(dir);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    if built.is_dir() { built } else { PathBuf::from("attention-tests/fixtures") }
}

/// Fails unless `|actual - expected| <= atol + rtol * |expected|` everywhere (and shapes match);
/// the message names `label`, the worst element's error and the tolerance it broke.
pub fn assert_close(
    actual: &Tensor,
    expected: &Tensor,
    atol: f64,
    rtol: f64,
    label: &str,
) -> Result<()> {
    if actual.size() != expected.size() {
        bail!("{label}: shape {:?} != expected {:?}", actual.size(), expected.size());
    }
    let a = actual.to_kind(Kind::Double).to_device(Device::Cpu);
    let e = expected.to_kind(Kind::Double).to_device(Device::Cpu);
    if a.numel() == 0 {
        return Ok(());
    }
    let err = (&a - &e).abs();
    let tol = e.abs() * rtol + atol;
    let excess = (&err - &tol).max().double_value(&[]);
    if excess.is_nan() || excess > 0.0 {
        let max_err = err.max().double_value(&[]);
        bail!(
            "{label}: max |err| {max_err:.3e} exceeds atol {atol:e} + rtol {rtol:e} * |expected|"
        );
    }
    Ok(())
}

/// The devices tests run on: the CPU, and CUDA when the `cuda` feature is on.
pub fn test_devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if cfg!(feature = "cuda") {
        d.push(Device::Cuda(0));
    }
    d
}
