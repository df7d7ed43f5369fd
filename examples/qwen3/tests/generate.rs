//! The decoder reproduces Hugging Face `generate` on the committed fixture: identical greedy
//! tokens and logits within 1e-4 (fp32) at every step, in the static context (one prompt at a
//! time) and in the paged dynamic context (all prompts in one batch, chunked prefill with a
//! budget below the longest prompt, small blocks), with both core-attention kinds.

use anyhow::{Result, bail};
use qwen3::{Error, Generation, PhaseTimes, Qwen3, Reference, fixture_dir, fixture_generations};
use tch::{Device, Kind, Tensor};

fn check(label: &str, got: &Generation, tokens: &[i64], logits: &Tensor) -> Result<()> {
    if got.tokens != tokens {
        bail!("{label}: tokens {:?}\n   expected {tokens:?}", got.tokens);
    }
    attention_tests_like_close(&got.logits, logits, label)
}

fn attention_tests_like_close(a: &Tensor, e: &Tensor, label: &str) -> Result<()> {
    if a.size() != e.size() {
        bail!("{label}: logits shape {:?} != {:?}", a.size(), e.size());
    }
    let err = (a.to_kind(Kind::Double) - e.to_kind(Kind::Double)).abs().max().double_value(&[]);
    if err.is_nan() || err > 1e-4 {
        bail!("{label}: max |logit error| {err:.3e} > 1e-4");
    }
    println!("{label}: max |logit error| {err:.3e}");
    Ok(())
}

#[test]
fn static_and_dynamic_generation_match_hugging_face() -> Result<()> {
    let dir = fixture_dir();
    let fixtures = fixture_generations(&dir)?;
    assert!(fixtures.len() >= 3);
    let longest = fixtures.iter().map(|f| f.prompt.len()).max().unwrap_or(0) as i64;
    for core in ["dot-product-attention", "sdpa"] {
        let model = Qwen3::load(&dir, core, Device::Cpu)?;
        let mut times = PhaseTimes::default();
        for (i, Reference { prompt, tokens, logits }) in fixtures.iter().enumerate() {
            let g = model.generate_static(prompt, tokens.len() as i64, &mut times)?;
            check(&format!("{core} static, prompt {i}"), &g, tokens, logits)?;
        }
        let prompts: Vec<Vec<i64>> = fixtures.iter().map(|f| f.prompt.clone()).collect();
        for (block_size, budget) in [(4, 16), (1, 7), (16, longest + 64)] {
            assert!(budget < longest || block_size == 16);
            let gens = model.generate_dynamic(&prompts, 32, block_size, budget, &mut times)?;
            for (i, (g, Reference { tokens, logits, .. })) in gens.iter().zip(&fixtures).enumerate()
            {
                check(
                    &format!("{core} dynamic (block {block_size}, budget {budget}), prompt {i}"),
                    g,
                    tokens,
                    logits,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn bad_inputs_are_typed_errors() -> Result<()> {
    let model = Qwen3::load(&fixture_dir(), "sdpa", Device::Cpu)?;
    let mut t = PhaseTimes::default();
    assert!(matches!(model.generate_static(&[], 4, &mut t), Err(Error::Invalid(_))));
    assert!(matches!(model.generate_static(&[1, 2], 1000, &mut t), Err(Error::Invalid(_))));
    assert!(matches!(model.generate_static(&[1, 9999], 2, &mut t), Err(Error::Invalid(_))));
    assert!(matches!(model.generate_dynamic(&[], 2, 4, 8, &mut t), Err(Error::Invalid(_))));
    // A checkpoint missing a tensor names it.
    let dir = fixture_dir();
    let config = qwen3::Qwen3Config::from_file(&dir.join("config.json"))?;
    let mut weights = attention_core::weights::read_safetensors(&dir.join("model.safetensors"))?;
    weights.remove("model.layers.1.mlp.up_proj.weight");
    match Qwen3::from_weights(config.clone(), &mut weights, "sdpa", Device::Cpu) {
        Err(Error::Missing(n)) if n == "model.layers.1.mlp.up_proj.weight" => {}
        other => bail!("expected a missing-tensor error, got {other:?}"),
    }
    let mut weights = attention_core::weights::read_safetensors(&dir.join("model.safetensors"))?;
    weights.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros([10, 256], (Kind::Float, Device::Cpu)),
    );
    match Qwen3::from_weights(config, &mut weights, "sdpa", Device::Cpu) {
        Err(Error::Convert(e))
            if e.to_string().contains("model.layers.0.self_attn.k_proj.weight") => {}
        other => bail!("expected a shape error naming k_proj, got {other:?}"),
    }
    Ok(())
}
