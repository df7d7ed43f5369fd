//! Links libtorch (rpath, libtorch_cuda). With the `cuda` feature, also compiles the libtorch
//! shim (`shim/cuda_shim.cpp`) and records where this build's libtorch lives, so NVRTC and the
//! CUDA headers of the same PyTorch wheel can be found at run time.
fn main() {
    attention_build::link_libtorch();
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        attention_build::compile_libtorch_shim("attention_cuda_shim", &["shim/cuda_shim.cpp"], &[]);
        let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
        // The graph shim includes libtorch's CUDA headers, which need the CUDA runtime headers
        // of the same wheel.
        let cuda_include = std::path::Path::new(&lib).join("../../nvidia/cu13/include");
        attention_build::compile_libtorch_shim(
            "attention_cuda_graph_shim",
            &["shim/graph_shim.cpp"],
            &[cuda_include],
        );
        println!("cargo:rustc-env=ATTENTION_CUDA_BUILD_TORCH_LIB={lib}");
    }
}
