//! Writes the machine code (CUBIN for sm_90) of one kernel variant, to read with `cuobjdump`
//! (`-res-usage`: registers and shared memory per kernel; `-sass -fun NAME`: the instructions).
//! The PyTorch wheel's Triton ships `cuobjdump` and `nvdisasm` under
//! `triton/backends/nvidia/bin`; NVRTC comes from the wheel too, so no GPU is needed.
//!
//! ```sh
//! cargo run --release -p attention-cuda --features cuda --example cubin -- bf16 128 mma16 /tmp/attn.cubin
//! ```
//!
//! Tiles: `mma16` (the one-row-tile decode build), `mma` (up to 64 rows), `p1`, `p2`, `p4`, `p8`
//! (CUDA cores, that many pairs per block). A tensor-core variant's module holds both row builds
//! and the static decode build's blocks of 2 and 4 key/value heads (`..._mma16g2`, `_mma16g4`).

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use anyhow::{Context, bail};
    use attention_cuda::runtime::{Tile, Variant, compile_cubin};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dtype, head_dim, tile, out] = <[String; 4]>::try_from(args)
        .ok()
        .context("usage: cubin DTYPE(bf16|f16|f32) HEAD_DIM TILE(mma16|mma|p1|p2|p4|p8) OUT")?;
    let dtype = match dtype.as_str() {
        "bf16" => "bf16",
        "f16" => "f16",
        "f32" => "f32",
        other => bail!("dtype {other:?}: bf16, f16 or f32"),
    };
    let head_dim: i64 = head_dim.parse().context("head dimension")?;
    let tile = match tile.as_str() {
        "mma16" => Tile::TensorCores { rows: 16 },
        "mma" => Tile::TensorCores { rows: 64 },
        p => match p.strip_prefix('p').map(str::parse::<i64>) {
            Some(Ok(pairs)) => Tile::CudaCores { pairs },
            _ => bail!("tile {p:?}: mma16, mma or p1, p2, p4, p8"),
        },
    };
    let variant = Variant { dtype, head_dim, tile };
    let cubin = compile_cubin("sm_90", Some(variant))?;
    std::fs::write(&out, cubin).with_context(|| format!("writing {out}"))?;
    println!(
        "{out}: {}, {} and the split combine, sm_90",
        variant.attend_name(false),
        variant.attend_name(true)
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("the cubin example needs the `cuda` feature");
}
