//! Finding NVRTC and the CUDA headers, compiling the kernels, loading them per device, and
//! launching on libtorch's current stream.
//!
//! The kernels (`kernels/attention.cu`) are compiled with NVRTC to machine code the first time a
//! device needs them, for that device's architecture, and cached for the process. NVRTC
//! (`libnvrtc.so.13`, `libnvrtc-builtins.so.13.0`) and the headers (`cuda_bf16.h`) come from the
//! PyTorch wheel's `nvidia/cu13` folder next to the libtorch in use: the one this crate was
//! built against, one found through `LD_LIBRARY_PATH`, or `ATTENTION_CUDA_DIR` (a folder with
//! `lib/` and `include/`). Work is launched on libtorch's current CUDA stream, so it is ordered
//! with tch's own ops without synchronisation.

use std::collections::HashMap;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::Error;

/// The kernel source.
pub const SOURCE: &str = include_str!("../kernels/attention.cu");

/// A folder holding `lib/libnvrtc.so.13` and `include/cuda_bf16.h`.
#[derive(Debug, Clone)]
pub struct CudaToolkitDir(pub PathBuf);

fn candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("ATTENTION_CUDA_DIR") {
        dirs.push(PathBuf::from(d));
    }
    // nvidia/cu13 sits two levels above torch/lib in the wheel layout.
    let from_torch_lib = |lib: &Path| lib.join("../../nvidia/cu13");
    let built = env!("ATTENTION_CUDA_BUILD_TORCH_LIB");
    if !built.is_empty() {
        dirs.push(from_torch_lib(Path::new(built)));
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for p in std::env::split_paths(&paths) {
            dirs.push(from_torch_lib(&p));
            dirs.push(p.join(".."));
        }
    }
    dirs
}

/// The first candidate folder with NVRTC and the headers.
pub fn toolkit_dir() -> Result<CudaToolkitDir, Error> {
    let all = candidates();
    all.iter()
        .find(|d| d.join("lib/libnvrtc.so.13").exists() && d.join("include/cuda_bf16.h").exists())
        .map(|d| CudaToolkitDir(d.canonicalize().unwrap_or_else(|_| d.clone())))
        .ok_or_else(|| Error::Toolkit(format!(
            "no folder with lib/libnvrtc.so.13 and include/cuda_bf16.h among {all:?} (set ATTENTION_CUDA_DIR)"
        )))
}

static NVRTC_LOADED: OnceLock<Result<CudaToolkitDir, String>> = OnceLock::new();

/// Loads NVRTC and its builtins by full path (NVRTC finds its builtins only through the loader
/// path, so they are loaded first and found by soname), once per process.
fn load_nvrtc() -> Result<CudaToolkitDir, Error> {
    NVRTC_LOADED
        .get_or_init(|| {
            let dir = toolkit_dir().map_err(|e| e.to_string())?;
            for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
                let path = dir.0.join("lib").join(name);
                #[expect(unsafe_code, reason = "loading NVRTC, a well-behaved C library, by path")]
                // SAFETY: the library's initialisers are NVRTC's own; it stays loaded (leaked)
                // for the life of the process, as cudarc expects.
                let lib = unsafe { libloading::Library::new(&path) }
                    .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
                std::mem::forget(lib);
            }
            Ok(dir)
        })
        .clone()
        .map_err(Error::Toolkit)
}

/// How the attention kernel maps a block's (token, head) pairs onto the multiprocessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tile {
    /// fp32 dot products on the CUDA cores for at most `pairs` pairs (1, 2, 4 or 8) per block.
    CudaCores {
        /// The most (token, head) pairs a block keeps.
        pairs: i64,
    },
    /// m16n8k16 MMAs on the tensor cores (bf16 and f16, head dimension 32, 64 or 128) for up
    /// to `rows` pairs per block: 64, or 16 (one row tile, fewer registers: decode).
    TensorCores {
        /// 16 or 64.
        rows: i64,
    },
}

/// One instantiation of the kernels: element type, head dimension and tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    /// `bf16`, `f16` or `f32`.
    pub dtype: &'static str,
    /// 32, 64, 128 or 256.
    pub head_dim: i64,
    /// CUDA cores or tensor cores.
    pub tile: Tile,
}

impl Variant {
    /// The attention kernel's name for a static or paged cache.
    pub fn attend_name(self, paged: bool) -> String {
        let cache = if paged { "paged" } else { "static" };
        let (dtype, hd) = (self.dtype, self.head_dim);
        match self.tile {
            Tile::CudaCores { pairs } => format!("attn_{cache}_{dtype}_{hd}_p{pairs}"),
            Tile::TensorCores { rows: 16 } => format!("attn_{cache}_{dtype}_{hd}_mma16"),
            Tile::TensorCores { .. } => format!("attn_{cache}_{dtype}_{hd}_mma"),
        }
    }

    fn defines(self) -> Vec<String> {
        let ctype = match self.dtype {
            "bf16" => "__nv_bfloat16",
            "f16" => "__half",
            _ => "float",
        };
        let mut d = vec![
            format!("-DATTN_TNAME={}", self.dtype),
            format!("-DATTN_T={ctype}"),
            format!("-DATTN_HD={}", self.head_dim),
        ];
        d.push(match self.tile {
            Tile::CudaCores { pairs } => format!("-DATTN_PAIRS={pairs}"),
            Tile::TensorCores { .. } => "-DATTN_MMA".into(),
        });
        d
    }
}

/// Compiles the kernels to PTX for `arch` (e.g. `sm_90`): one variant, or all of them. Needs
/// NVRTC, not a GPU.
pub fn compile_ptx(arch: &'static str, variant: Option<Variant>) -> Result<Ptx, Error> {
    let bytes = nvrtc_compile(arch, variant, false)?;
    Ok(Ptx::from_src(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Compiles the kernels to machine code (CUBIN) for `arch`, a real architecture such as
/// `sm_90`: what `kernels` loads. NVRTC's own assembler does the work, so nothing is left to
/// the driver's PTX compiler at load time (which may be another version than the `ptxas` the
/// PTX test checks registers with). Needs NVRTC, not a GPU.
pub fn compile_cubin(arch: &'static str, variant: Option<Variant>) -> Result<Vec<u8>, Error> {
    nvrtc_compile(arch, variant, true)
}

fn nvrtc_compile(arch: &str, variant: Option<Variant>, cubin: bool) -> Result<Vec<u8>, Error> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    let dir = load_nvrtc()?;
    let mut options = vec![
        format!("--include-path={}", dir.0.join("include").display()),
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--extra-device-vectorization".into(),
    ];
    match variant {
        Some(v) => options.extend(v.defines()),
        None => options.push("-DATTN_ALL".into()),
    }
    let nvrtc = |what: &str, e: cudarc::nvrtc::result::NvrtcError| {
        Error::Compile(format!("NVRTC {what}: {e:?} (options {options:?})"))
    };
    // NVRTC's NUL-terminated C characters as bytes.
    let bytes = |chars: Vec<std::ffi::c_char>| -> Vec<u8> {
        chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect()
    };
    let build = || -> Result<Vec<u8>, Error> {
        let src = CString::new(SOURCE).map_err(|e| Error::Compile(e.to_string()))?;
        let name = c"attention.cu";
        let prog = result::create_program(&src, Some(name)).map_err(|e| nvrtc("create", e))?;
        #[expect(unsafe_code, reason = "NVRTC's C API: compile, read the output, free")]
        // SAFETY: `prog` comes from create_program above and is destroyed exactly once, after
        // the last call that uses it; each output buffer has the size NVRTC reported for it.
        let out = unsafe {
            let out = match result::compile_program(prog, &options) {
                Err(e) => {
                    let log = bytes(result::get_program_log(prog).unwrap_or_default());
                    let log = String::from_utf8_lossy(&log);
                    Err(Error::Compile(format!("{e:?} (options {options:?}): {log}")))
                }
                Ok(()) if cubin => {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| nvrtc("CUBIN size", e))
                        .and_then(|()| {
                            let mut buf = vec![0u8; size];
                            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                                .result()
                                .map_err(|e| nvrtc("CUBIN", e))?;
                            Ok(buf)
                        })
                }
                Ok(()) => result::get_ptx(prog).map_err(|e| nvrtc("PTX", e)).map(bytes),
            };
            let _ = result::destroy_program(prog);
            out
        };
        out
    };
    catch_unwind(std::panic::AssertUnwindSafe(build))
        .map_err(|_| Error::Toolkit("NVRTC could not be loaded".into()))?
}

/// One compiled variant on one device.
#[derive(Debug)]
pub struct Kernels {
    /// The device's primary context (libtorch's).
    pub ctx: Arc<CudaContext>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<(String, u32, u32), Loaded>>,
    /// Multiprocessors.
    pub sm_count: i64,
    /// The most dynamic shared memory a block may opt in to, bytes.
    pub smem_optin: u32,
    /// Whether the device takes programmatic dependent launches (compute capability 9.0+).
    pub programmatic: bool,
}

type KernelCache = Mutex<HashMap<(usize, Variant), Arc<Kernels>>>;
static KERNELS: OnceLock<KernelCache> = OnceLock::new();

fn arch_name(major: i32, minor: i32) -> Result<&'static str, Error> {
    Ok(match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => {
            return Err(Error::Unsupported(format!(
                "compute capability {major}.{minor} (kernels are built for 8.0 and newer)"
            )));
        }
    })
}

/// The kernels of `variant` on CUDA device `ordinal`, compiled and loaded on first use (a few
/// seconds of NVRTC per variant and device, once per process).
pub fn kernels(ordinal: usize, variant: Variant) -> Result<Arc<Kernels>, Error> {
    let map = KERNELS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&(ordinal, variant)) {
        return Ok(k.clone());
    }
    let ctx = catch_unwind(|| CudaContext::new(ordinal))
        .map_err(|_| Error::Toolkit("the CUDA driver (libcuda.so.1) could not be loaded".into()))?
        .map_err(|e| Error::Driver(format!("{e:?}")))?;
    #[expect(
        unsafe_code,
        reason = "cudarc's event tracking is off: kernels get raw libtorch pointers"
    )]
    // SAFETY: no CudaSlice of this context is ever created, so there is nothing to track.
    unsafe {
        ctx.disable_event_tracking();
    }
    let (major, minor) = ctx.compute_capability().map_err(|e| Error::Driver(format!("{e:?}")))?;
    let cubin = compile_cubin(arch_name(major, minor)?, Some(variant))?;
    let module =
        ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| Error::Driver(format!("{e:?}")))?;
    let sm_count = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| Error::Driver(format!("{e:?}")))? as i64;
    let smem_optin = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .map_err(|e| Error::Driver(format!("{e:?}")))? as u32;
    let k = Arc::new(Kernels {
        ctx,
        module,
        functions: Mutex::new(HashMap::new()),
        sm_count,
        smem_optin,
        programmatic: major >= 9,
    });
    map.insert((ordinal, variant), k.clone());
    Ok(k)
}

/// A loaded kernel and how many of its blocks fit on one multiprocessor.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The kernel.
    pub func: CudaFunction,
    /// Resident blocks per multiprocessor at the block size and shared memory it was loaded
    /// for (at least 1).
    pub resident: i64,
    /// Registers per thread.
    pub registers: i64,
    /// Local memory per thread in bytes (register spills; 0 for every kernel here).
    pub local_bytes: i64,
}

impl Kernels {
    /// A kernel by name, with its dynamic shared-memory limit raised to `smem` bytes and its
    /// occupancy at `threads` per block (loaded and queried once per name, block size and
    /// shared-memory size).
    pub fn function(&self, name: &str, threads: u32, smem: u32) -> Result<Loaded, Error> {
        let mut f = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let key = (name.to_string(), threads, smem);
        if let Some(loaded) = f.get(&key) {
            return Ok(loaded.clone());
        }
        let driver = |e: cudarc::driver::DriverError| Error::Driver(format!("{name}: {e:?}"));
        // Loading and the occupancy query need the context current on this thread.
        self.ctx.bind_to_thread().map_err(driver)?;
        let func = self.module.load_function(name).map_err(driver)?;
        // The kernel's own (static) shared memory counts against the same limit.
        let fixed = func.shared_size_bytes().map_err(driver)?.max(0) as u32;
        if smem + fixed > self.smem_optin {
            return Err(Error::Unsupported(format!(
                "{name}: {smem} + {fixed} bytes of shared memory (the device allows {})",
                self.smem_optin
            )));
        }
        // The limit is the device's (one function handle serves every entry of its name).
        if smem > 48 * 1024 {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                (self.smem_optin - fixed) as i32,
            )
            .map_err(driver)?;
        }
        let resident = func
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
            .map_err(driver)?
            .max(1) as i64;
        let registers = func.num_regs().map_err(driver)? as i64;
        let local_bytes = func.local_size_bytes().map_err(driver)? as i64;
        let loaded = Loaded { func, resident, registers, local_bytes };
        f.insert(key, loaded.clone());
        Ok(loaded)
    }

    /// libtorch's current stream on `ordinal`, borrowed.
    pub fn torch_stream(&self, ordinal: usize) -> Result<Arc<CudaStream>, Error> {
        let raw = crate::shim::current_stream(ordinal)?;
        #[expect(unsafe_code, reason = "wrapping libtorch's stream, which outlives the call")]
        // SAFETY: the stream belongs to libtorch and lives as long as its device context;
        // cudarc's borrowed wrapper never destroys it.
        Ok(unsafe { self.ctx.wrap_borrowed_stream(raw as cudarc::driver::sys::CUstream) })
    }
}
