//! Project automation, run as `cargo xtask <command>` (see the README).
//!
//! It depends on nothing but `std`, so it builds before libtorch exists; its first job is to
//! make libtorch exist. Commands:
//!
//! * `setup` — create `.venv` with the packages of `tools/requirements.txt` (PyTorch 2.11.0,
//!   whose libtorch the build links) and `tools/requirements-nodeps.txt` (model files) when
//!   missing or stale, and point `.venv/libtorch` at the
//!   wheel's `torch` folder, which `.cargo/config.toml` names as `LIBTORCH`.
//! * `attn [ARGS...]` — set up, then run the `attn` binary (release build) with `ARGS`.
//! * `ci` — set up, then everything CI checks: formatting, clippy with warnings denied, each
//!   library crate built alone and with each of its features, clippy over the CUDA code, the
//!   whole test suite, and every CUDA kernel compiled to PTX (NVRTC, no GPU).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const TORCH_VERSION: &str = "2.11.0";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup().map(|_| ()),
        Some("attn") => setup().and_then(|_| attn(&args[1..])),
        Some("ci") => setup().and_then(|_| ci()),
        _ => Err(format!(
            "usage: cargo xtask <setup | attn [ARGS...] | ci>, got {:?}",
            args.join(" ")
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: $ {shown}");
    let status = cmd.status().map_err(|e| format!("cannot start {shown}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{shown} failed with {status}")) }
}

fn python_output(python: &Path, code: &str) -> Option<String> {
    let out = Command::new(python).args(["-c", code]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes sure `.venv` holds the pinned packages and `.venv/libtorch` points at torch.
fn setup() -> Result<PathBuf, String> {
    let root = root();
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    let requirements = root.join("tools/requirements.txt");
    let nodeps = root.join("tools/requirements-nodeps.txt");
    let stamp = venv.join(".requirements.installed");
    let mut wanted = String::new();
    for file in [&requirements, &nodeps] {
        wanted += &std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    }
    let installed = std::fs::read_to_string(&stamp).unwrap_or_default();
    let torch_ok = python_output(&python, "import torch; print(torch.__version__)")
        .is_some_and(|v| v.split('+').next() == Some(TORCH_VERSION));
    if !(torch_ok && installed == wanted) {
        if !python.exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        }
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"]))?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements))?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "-r"])
            .arg(&nodeps))?;
        std::fs::write(&stamp, &wanted)
            .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    }
    let torch_dir =
        python_output(&python, "import torch, os; print(os.path.dirname(torch.__file__))")
            .ok_or("torch does not import from .venv after installation")?;
    let link = venv.join("libtorch");
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() != Some(Path::new(&torch_dir)) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&torch_dir, &link)
            .map_err(|e| format!("cannot link {} -> {torch_dir}: {e}", link.display()))?;
    }
    Ok(venv)
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn attn(args: &[String]) -> Result<(), String> {
    let root = root();
    run(cargo(&root)
        .args(["run", "--quiet", "--release", "--package", "attention-cli", "--"])
        .args(args))
}

/// Library crates and the features CI builds each of them with (alone, then one by one).
const FEATURE_MATRIX: &[(&str, &[&str])] = &[
    ("attention-spec", &[]),
    ("attention-core", &["cuda"]),
    ("attention-inference", &["cuda"]),
    ("attention-cuda", &["cuda"]),
];

fn ci() -> Result<(), String> {
    let root = root();
    run(cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
    run(cargo(&root).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The CUDA code (no GPU needed to build it) under the same lints.
    run(cargo(&root).args([
        "clippy",
        "--package",
        "attention-cuda",
        "--package",
        "attention-tests",
        "--package",
        "attention-cli",
        "--all-targets",
        "--features",
        "attention-cuda/cuda,attention-tests/cuda,attention-cli/cuda",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The docs, with and without the CUDA code: every intra-doc link resolves (the workspace
    // denies broken ones), so a default-feature build such as docs.rs's documents the crates.
    run(cargo(&root).args(["doc", "--workspace", "--no-deps"]))?;
    run(cargo(&root).args([
        "doc",
        "--workspace",
        "--no-deps",
        "--features",
        "attention-cuda/cuda,attention-tests/cuda,attention-cli/cuda",
    ]))?;
    for (krate, features) in FEATURE_MATRIX {
        run(cargo(&root).args(["check", "--package", krate, "--all-targets"]))?;
        for feature in *features {
            run(cargo(&root).args([
                "check",
                "--package",
                krate,
                "--all-targets",
                "--features",
                feature,
            ]))?;
        }
    }
    run(cargo(&root).args(["test", "--workspace"]))?;
    // Every CUDA kernel variant compiles to PTX for sm_90 with the wheel's NVRTC, and the
    // launch geometry's unit tests (split-KV, heads per block) run (no GPU).
    run(cargo(&root).args([
        "test",
        "--package",
        "attention-cuda",
        "--features",
        "cuda",
        "--lib",
        "--test",
        "ptx",
    ]))
}
