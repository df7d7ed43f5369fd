//! Gives this crate's test binaries an rpath to libtorch (see `attention-build`), and records the
//! commit the checkout's HEAD named at build time (`ATTN_GIT_COMMIT`; "unknown" outside a git
//! checkout) for `attn bench`'s JSON. Uncommitted changes are not part of it.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    attention_build::link_libtorch();
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ATTN_GIT_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "refs/heads", "packed-refs"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
    }
}
