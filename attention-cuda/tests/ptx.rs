//! Every kernel variant compiles with NVRTC for sm_90 and assembles without register spills,
//! on a machine without a GPU: this catches kernel compile errors and spills in CI. Needs the
//! `cuda` feature and the project's PyTorch wheel (its NVRTC, and `torch/bin/ptxas`, the CUDA
//! 13.0 assembler). Variants are compiled one by one (as a GPU run loads them), spread over
//! the machine's cores.
#![cfg(feature = "cuda")]

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Result, bail};
use attention_cuda::runtime::{Tile, Variant, compile_ptx, toolkit_dir};

/// Every variant the launcher can ask for.
fn variants() -> Vec<Variant> {
    let mut all = Vec::new();
    for dtype in ["bf16", "f16", "f32"] {
        for head_dim in attention_cuda::KERNEL_HEAD_DIMS {
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

/// Bytes of spill stores an entry may have: none, except the head-dimension-128 builds of
/// several row tiles, which ask for three resident blocks and pay for them with a few spilled
/// values (`ATTN_MMA_BOUNDS_128` in the kernels: measured faster than two blocks unspilled);
/// ptxas stored 120 (paged) and 160 (static) bytes when that was measured, and 164 in the f16
/// static build once the builds' probabilities were taken with `ex2.approx.ftz`.
fn allowed_spill(entry: &str) -> u32 {
    if entry.ends_with("_128_mma") { 168 } else { 0 }
}

/// Compiles `v`, checks its entry points, then assembles the PTX with `ptxas` into `dir` and
/// requires every entry to keep its registers (no spill stores to local memory beyond
/// `allowed_spill`: ptxas decides register budgets by its own heuristics, which a small kernel
/// change can tip into spilling).
fn check(arch: &'static str, v: Variant, ptxas: &Path, dir: &Path) -> Result<()> {
    let ptx = compile_ptx(arch, Some(v))?.to_src();
    let mut names = vec![
        format!("attn_combine_{}_{}", v.dtype, v.head_dim),
        format!("attn_append_{}_{}", v.dtype, v.head_dim),
        format!("attn_merge_{}_{}", v.dtype, v.head_dim),
    ];
    for paged in [false, true] {
        names.push(v.attend_name(paged));
        if let Tile::TensorCores { .. } = v.tile {
            let decode = Variant { tile: Tile::TensorCores { rows: 16 }, ..v };
            names.push(decode.attend_name(paged));
            // Blocks of 2 and 4 key/value heads (static decode).
            if !paged {
                names.extend([2, 4].map(|g| format!("{}g{g}", decode.attend_name(false))));
            }
        }
    }
    for name in names {
        if !ptx.contains(&format!(".entry {name}(")) {
            bail!("{arch}: no entry {name} in the PTX of {v:?}");
        }
    }
    // No local-memory arrays in the PTX itself.
    if ptx.contains(".local") {
        bail!("{arch}: the PTX of {v:?} uses local memory");
    }
    // No static shared memory in the attention kernels: it would sit before the dynamic region
    // and shift it off the 128-byte alignment the swizzled key/value rows rely on (the combine
    // kernel's reduction scratch is the one static array).
    for line in ptx.lines().map(str::trim) {
        if line.starts_with(".shared") && !line.contains("_ZZ7combineI") {
            bail!("{arch}: static shared memory in the PTX of {v:?}: {line}");
        }
    }
    let file = dir.join(format!("{}_{}_{:?}.ptx", v.dtype, v.head_dim, v.tile));
    std::fs::write(&file, ptx)?;
    let out = Command::new(ptxas)
        .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
        .arg(&file)
        .output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("ptxas failed on {v:?}: {log}");
    }
    // "Compiling entry function 'NAME' for 'sm_90'" comes before the entry's
    // "N bytes stack frame, S bytes spill stores, L bytes spill loads".
    let mut entry = "";
    let mut spills = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("entry function '").nth(1) {
            entry = rest.split('\'').next().unwrap_or("");
        } else if line.contains("spill stores") {
            let stored = line
                .split(" bytes spill stores")
                .next()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u32>().ok());
            if stored.is_none_or(|n| n > allowed_spill(entry)) {
                spills.push(format!("{entry}: {}", line.trim()));
            }
        }
    }
    if !spills.is_empty() {
        bail!("{arch}: register spills\n{}", spills.join("\n"));
    }
    Ok(())
}

/// Runs `check` on every variant, spread over the machine's cores; fails with every failure.
fn for_every_variant(check: impl Fn(Variant) -> Result<()> + Sync) -> Result<()> {
    let queue = Mutex::new(variants());
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some(v) = next else { break };
                    if let Err(e) = check(v) {
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

#[test]
fn every_kernel_compiles_and_keeps_its_registers() -> Result<()> {
    let ptxas = toolkit_dir()?.0.join("../../torch/bin/ptxas");
    if !ptxas.exists() {
        bail!("no ptxas at {} (it ships in the PyTorch wheel)", ptxas.display());
    }
    let dir = std::env::temp_dir().join(format!("attention-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = for_every_variant(|v| check("sm_90", v, &ptxas, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What a GPU run loads: NVRTC's machine code for the device's architecture (an ELF image
/// with the variant's entry points), not PTX left to the driver.
#[test]
fn kernels_compile_to_machine_code() -> Result<()> {
    let v = Variant { dtype: "bf16", head_dim: 128, tile: Tile::TensorCores { rows: 64 } };
    let cubin = attention_cuda::runtime::compile_cubin("sm_90", Some(v))?;
    if !cubin.starts_with(b"\x7fELF") {
        bail!("not an ELF image: {:?}", &cubin[..cubin.len().min(16)]);
    }
    let has = |name: &str| cubin.windows(name.len()).any(|w| w == name.as_bytes());
    for paged in [false, true] {
        let name = v.attend_name(paged);
        if !has(&name) {
            bail!("no {name} in the CUBIN");
        }
    }
    // The compile error path names the problem (an architecture NVRTC does not know).
    let err = attention_cuda::runtime::compile_cubin("sm_1", Some(v)).err();
    match err {
        Some(e) if e.to_string().contains("sm_1") => Ok(()),
        other => bail!("unexpected {other:?}"),
    }
}
