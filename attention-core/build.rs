//! Links libtorch (rpath, libtorch_cuda) and compiles the C++ shim (`shim/shim.cpp`): custom
//! autograd functions with Rust callbacks, gradient accumulation, generator states and device
//! memory statistics, which tch does not bind.
fn main() {
    attention_build::link_libtorch();
    attention_build::compile_libtorch_shim("attention_core_shim", &["shim/shim.cpp"], &[]);
}
