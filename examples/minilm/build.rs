//! Gives this crate's test binaries an rpath to libtorch (see `attention-build`).
fn main() {
    attention_build::link_libtorch();
}
