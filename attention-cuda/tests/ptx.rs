//! Every kernel variant compiles with NVRTC for sm_90, on a machine without a GPU: this
//! catches kernel compile errors in CI. Needs the `cuda` feature and the NVRTC of the
//! project's PyTorch wheel. Variants are compiled one by one (as a GPU run loads them), spread
//! over the machine's cores.
#![cfg(feature = "cuda")]

use std::sync::Mutex;

use anyhow::{Result, bail};
use attention_cuda::runtime::{Tile, Variant, compile_ptx};

/// Every variant the launcher can ask for.
fn variants() -> Vec<Variant> {
    let mut all = Vec::new();
    for dtype in ["bf16", "f16", "f32"] {
        for head_dim in [32, 64, 128, 256] {
            for pairs in [1, 2, 4, 8] {
                all.push(Variant { dtype, head_dim, tile: Tile::CudaCores { pairs } });
            }
            // Tensor cores: 16-bit types up to head dimension 128 (one compilation holds both
            // row builds).
            if dtype != "f32" && head_dim <= 128 {
                all.push(Variant { dtype, head_dim, tile: Tile::TensorCores { rows: 64 } });
            }
        }
    }
    all
}

fn check(arch: &'static str, v: Variant) -> Result<()> {
    let ptx = compile_ptx(arch, Some(v))?.to_src();
    let mut names = vec![format!("attn_combine_{}_{}", v.dtype, v.head_dim)];
    for paged in [false, true] {
        names.push(v.attend_name(paged));
        if let Tile::TensorCores { .. } = v.tile {
            let decode = Variant { tile: Tile::TensorCores { rows: 16 }, ..v };
            names.push(decode.attend_name(paged));
        }
    }
    for name in names {
        if !ptx.contains(&format!(".entry {name}(")) {
            bail!("{arch}: no entry {name} in the PTX of {v:?}");
        }
    }
    // No local-memory spills of the register arrays.
    if ptx.contains(".local") {
        bail!("{arch}: the PTX of {v:?} uses local memory");
    }
    Ok(())
}

#[test]
fn every_kernel_compiles_to_ptx() -> Result<()> {
    let queue = Mutex::new(variants());
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some(v) = next else { break };
                    if let Err(e) = check("sm_90", v) {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    if !failures.is_empty() {
        bail!("{} variants failed:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}
