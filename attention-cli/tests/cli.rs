//! The `attn` binary end to end: exit codes, one-line errors, the main job on the embedded
//! default and the example configs, parity on the committed fixtures.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Result, bail};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn attn(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_attn")).args(args).current_dir(root()).output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expect_ok(args: &[&str]) -> Result<String> {
    let o = attn(args)?;
    if !o.status.success() {
        bail!("attn {args:?} failed: {}{}", stdout(&o), stderr(&o));
    }
    Ok(stdout(&o))
}

/// Fails unless the command exits non-zero with a single `attn: error:` line containing `needle`.
fn expect_error(args: &[&str], needle: &str) -> Result<()> {
    let o = attn(args)?;
    let err = stderr(&o);
    if o.status.success() {
        bail!("attn {args:?} succeeded, expected an error containing {needle:?}");
    }
    if err.trim().lines().count() != 1 || !err.starts_with("attn: error: ") || !err.contains(needle)
    {
        bail!("attn {args:?}: expected one error line containing {needle:?}, got {err:?}");
    }
    Ok(())
}

#[test]
fn run_default_config() -> Result<()> {
    let out = expect_ok(&["run", "--seq-len", "16", "--iters", "1"])?;
    for needle in
        ["<default>", "parameters: 1310976", "layer 2: output [16, 2, 512]", "forward+backward"]
    {
        if !out.contains(needle) {
            bail!("missing {needle:?} in:\n{out}");
        }
    }
    Ok(())
}

#[test]
fn run_json_reports_both_contexts() -> Result<()> {
    let out = expect_ok(&[
        "run",
        "--json",
        "--seq-len",
        "8",
        "--iters",
        "1",
        "--prompt-len",
        "20",
        "--decode-steps",
        "4",
        "--batch",
        "3",
        "--block-size",
        "3",
        "--token-budget",
        "16",
    ])?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    for ctx in ["static", "dynamic"] {
        for key in [
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "kv_cache_bytes",
            "max_abs_err_vs_full_forward",
        ] {
            let x = v[ctx][key]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("{ctx}.{key} missing in {out}"))?;
            if key == "max_abs_err_vs_full_forward" && (x.is_nan() || x >= 1e-5) {
                bail!("{ctx}: error {x} against the full forward");
            }
            if key != "max_abs_err_vs_full_forward" && (x.is_nan() || x <= 0.0) {
                bail!("{ctx}.{key} = {x}");
            }
        }
    }
    Ok(())
}

#[test]
fn train_step_with_every_extra() -> Result<()> {
    let out = expect_ok(&[
        "train-step",
        "--json",
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--recompute",
        "--delay-wgrad",
        "--qk-clip",
        "--qk-clip-threshold",
        "0.01",
        "--test-mode",
    ])?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let steps = v["steps"].as_array().ok_or_else(|| anyhow::anyhow!("no steps in {out}"))?;
    if steps.len() != 2 {
        bail!("{out}");
    }
    for s in steps {
        // Two layers, each with linear_qkv and linear_proj deferred once.
        if s["deferred_wgrads"] != 4
            || s["clip_factors"][0]["clipped"] != true
            || !s["loss"].is_f64()
        {
            bail!("unexpected step {s}");
        }
    }
    expect_error(&["train-step", "--steps", "0"], "at least 1")?;
    Ok(())
}

#[test]
fn run_and_check_example_configs() -> Result<()> {
    for file in ["gpt-mha.toml", "gqa-rmsnorm-qkv-bias.toml", "cross-attention.toml"] {
        let path = format!("examples/configs/{file}");
        let out = expect_ok(&["check", &path])?;
        if !out.contains("linear_proj.weight") || !out.contains("parameters:") {
            bail!("check {file}: {out}");
        }
        expect_ok(&[
            "run",
            &path,
            "--seq-len",
            "8",
            "--iters",
            "1",
            "--prompt-len",
            "6",
            "--decode-steps",
            "2",
        ])?;
    }
    Ok(())
}

#[test]
fn parity_on_committed_fixtures() -> Result<()> {
    let out =
        expect_ok(&["parity", "attention-tests/fixtures/megatron", "--core-attention", "sdpa"])?;
    if !out.trim_end().ends_with(" failed") || !out.contains(", 0 failed") {
        bail!("{out}");
    }
    Ok(())
}

#[test]
fn errors_are_one_line_and_non_zero() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("attn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[transformer]\nhidden_size = 64\nnum_attention_heads = 3\nnum_query_groups = 2\n",
    )?;
    let bad = bad.to_string_lossy().into_owned();
    expect_error(&["check", &bad], "line 4, column 1, `transformer.num_query_groups`")?;
    expect_error(&["run", &bad], "must be a multiple of num_query_groups")?;
    expect_error(&["check", "does/not/exist.toml"], "cannot read")?;
    expect_error(&["run", "--device", "tpu"], "unknown device")?;
    expect_error(
        &["parity", "attention-tests/fixtures/megatron", "--core-attention", "flash"],
        "unknown core attention kind",
    )?;
    expect_error(
        &["parity", "attention-tests/fixtures/megatron", "--core-attention", "rms-norm"],
        "not a core attention",
    )?;
    expect_error(&["run", "--seq-len", "0"], "at least 1")?;
    expect_error(&["run", "--block-size", "0"], "--block-size must be at least 1")?;
    expect_error(&["run", "--decode-steps=-1"], "--decode-steps")?;
    expect_error(&["run", "--no-such-flag"], "unexpected argument '--no-such-flag'")?;
    expect_error(&["frobnicate"], "unrecognized subcommand")?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
