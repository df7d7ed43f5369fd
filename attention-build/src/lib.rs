//! Build-script helper for crates that link libtorch through `tch`.
//!
//! Cargo does not pass `rustc-link-arg` from `torch-sys` on to the binaries, tests and benches
//! of the crates that use it, so on its own a tch binary has no rpath to libtorch (it fails to
//! start without `LD_LIBRARY_PATH`) and the linker's `--as-needed` drops `libtorch_cuda`, which
//! makes CUDA silently unavailable on a GPU machine. Every crate of this workspace that produces
//! a binary calls [`link_libtorch`] from its `build.rs`; a downstream crate does the same:
//!
//! ```toml
//! [dependencies]
//! torch-sys = "=0.24.0"   # must be a direct dependency: only then is DEP_TCH_LIBTORCH_LIB set
//! [build-dependencies]
//! attention-build = "0.0.0"
//! ```
//!
//! ```text
//! // build.rs
//! fn main() {
//!     attention_build::link_libtorch();
//! }
//! ```
//!
//! Other crates of the family: `attention-spec` (configs and the module registry),
//! `attention-core` (the modules), `attention-inference` (KV-cache contexts),
//! `attention-cuda` (CUDA fast paths), `attention-cli` (the `attn` binary).

use std::path::{Path, PathBuf};

/// Emits the link arguments every libtorch binary of the crate being built needs.
///
/// * `-Wl,-rpath,<torch lib>` so binaries find libtorch without `LD_LIBRARY_PATH`;
/// * `-Wl,--no-as-needed -ltorch_cuda -lc10_cuda` when the libtorch install has CUDA, so that
///   `tch::Cuda::is_available()` is true on a GPU machine.
///
/// # Panics
///
/// When `DEP_TCH_LIBTORCH_LIB` is unset, i.e. the calling crate does not depend on
/// `torch-sys` directly. A build script has no better way to report a misconfiguration.
pub fn link_libtorch() {
    #[expect(clippy::expect_used, reason = "a build script reports misconfiguration by panicking")]
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is unset: add `torch-sys = \"=0.24.0\"` as a direct dependency",
    );
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let dir = Path::new(&lib);
    if dir.join("libtorch_cuda.so").exists() {
        let mut libs = String::from("-Wl,--no-as-needed,-ltorch_cuda");
        if dir.join("libc10_cuda.so").exists() {
            libs.push_str(",-lc10_cuda");
        }
        libs.push_str(",--as-needed");
        println!("cargo:rustc-link-arg={libs}");
    }
}

/// The libtorch include folders (`include` and `include/torch/csrc/api/include` next to the lib
/// folder torch-sys links).
///
/// # Panics
///
/// As [`link_libtorch`], when `DEP_TCH_LIBTORCH_LIB` is unset.
pub fn libtorch_include_dirs() -> Vec<PathBuf> {
    #[expect(clippy::expect_used, reason = "a build script reports misconfiguration by panicking")]
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "DEP_TCH_LIBTORCH_LIB is unset: add `torch-sys = \"=0.24.0\"` as a direct dependency",
    );
    let root = Path::new(&lib).parent().map(Path::to_path_buf).unwrap_or_default();
    vec![root.join("include"), root.join("include/torch/csrc/api/include")]
}

/// Compiles C++ files against the libtorch headers (C++17, the CXX11 ABI libtorch uses) into a
/// static library `name` linked into the calling crate, with `extra_includes` searched after
/// libtorch's (e.g. the CUDA runtime headers that libtorch's CUDA headers need). Only public
/// ATen/torch APIs belong in such a shim: libtorch's private ABI changes with every release.
pub fn compile_libtorch_shim(name: &str, files: &[&str], extra_includes: &[PathBuf]) {
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .includes(libtorch_include_dirs())
        .includes(extra_includes)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .files(files)
        .compile(name);
}
