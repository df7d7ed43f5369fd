//! Every kernel variant compiles with NVRTC for sm_90, on a machine without a GPU: this
//! catches kernel compile errors in CI. Needs the `cuda` feature and the NVRTC of the
//! project's PyTorch wheel.
#![cfg(feature = "cuda")]

use anyhow::{Result, bail};

#[test]
fn every_kernel_compiles_to_ptx() -> Result<()> {
    for arch in ["sm_90"] {
        let ptx = attention_cuda::runtime::compile_ptx(arch, None)?.to_src();
        for dtype in ["bf16", "f16", "f32"] {
            for hd in [32, 64, 128, 256] {
                let mut names = vec![format!("attn_combine_{dtype}_{hd}")];
                for kind in ["static", "paged"] {
                    for pairs in [1, 2, 4, 8] {
                        names.push(format!("attn_{kind}_{dtype}_{hd}_p{pairs}"));
                    }
                    // Tensor cores: 16-bit types up to head dimension 128.
                    if dtype != "f32" && hd <= 128 {
                        names.push(format!("attn_{kind}_{dtype}_{hd}_mma"));
                        names.push(format!("attn_{kind}_{dtype}_{hd}_mma16"));
                    }
                }
                for name in names {
                    if !ptx.contains(&format!(".entry {name}(")) {
                        bail!("{arch}: no entry {name} in the PTX");
                    }
                }
            }
        }
        // No local-memory spills of the register arrays in the attention kernels.
        if ptx.contains(".local") {
            bail!("{arch}: the PTX uses local memory");
        }
    }
    Ok(())
}
