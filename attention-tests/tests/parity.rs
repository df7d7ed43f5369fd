//! Every committed Megatron-Core fixture passes with both core-attention kinds.

use anyhow::{Result, bail};
use attention_tests::parity::{find_cases, run_case};
use attention_tests::{fixtures_dir, test_devices};

fn run_all(core_attention: Option<&str>) -> Result<()> {
    let cases = find_cases(&[fixtures_dir().join("megatron")])?;
    if cases.len() < 20 {
        bail!("expected at least 20 Megatron fixtures, found {}", cases.len());
    }
    for device in test_devices() {
        let reports: Vec<_> = cases.iter().map(|c| run_case(c, core_attention, device)).collect();
        let failed: Vec<String> =
            reports.iter().filter(|r| !r.passed()).map(|r| r.to_string()).collect();
        if !failed.is_empty() {
            bail!(
                "{} of {} cases failed on {device:?}:\n{}",
                failed.len(),
                reports.len(),
                failed.join("\n")
            );
        }
    }
    Ok(())
}

#[test]
fn megatron_fixtures_dot_product_attention() -> Result<()> {
    run_all(None)
}

#[test]
fn megatron_fixtures_sdpa() -> Result<()> {
    run_all(Some("sdpa"))
}
