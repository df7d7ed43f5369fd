//! all-MiniLM-L6-v2 against Hugging Face transformers: the reference in `fixtures/` is written
//! by `tools/hf-reference/minilm_reference.py` from the same package files; the model files
//! are found by `minilm::model_dir()` (the project's `.venv`, or `MINILM_MODEL_DIR`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use attention_core::convert::ConvertError;
use attention_core::weights::LoadError;
use minilm::{Encoder, Error, MiniLm, MiniLmTokenizer};
use tch::{Device, Kind, Tensor};

/// Per-sentence cosine lower bound and element-wise absolute error bound (fp32).
const MIN_COSINE: f64 = 0.99999;
const MAX_ABS_ERR: f64 = 1e-4;

struct Reference {
    sentences: Vec<String>,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn load() -> anyhow::Result<Self> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let sentences = json["sentences"]
            .as_array()
            .context("reference.json: no sentences")?
            .iter()
            .map(|s| s.as_str().map(str::to_string).context("a sentence is not a string"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tensors =
            attention_core::weights::read_safetensors(&dir.join("reference.safetensors"))?;
        Ok(Self { sentences, tensors })
    }

    fn texts(&self) -> Vec<&str> {
        self.sentences.iter().map(String::as_str).collect()
    }

    fn get(&self, name: &str) -> anyhow::Result<&Tensor> {
        self.tensors.get(name).with_context(|| format!("reference tensor {name} missing"))
    }
}

fn model_dir() -> anyhow::Result<PathBuf> {
    Ok(minilm::model_dir()?)
}

fn hf_tensors() -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(attention_core::weights::read_safetensors(&model_dir()?.join("model.safetensors"))?)
}

/// A copy of `tensors` (sharing storage) with `name` removed or replaced.
fn edited(
    tensors: &HashMap<String, Tensor>,
    name: &str,
    replacement: Option<Tensor>,
) -> HashMap<String, Tensor> {
    let mut out: HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    out.remove(name);
    if let Some(t) = replacement {
        out.insert(name.to_string(), t);
    }
    out
}

#[test]
fn tokenizer_matches_reference() -> anyhow::Result<()> {
    let reference = Reference::load()?;
    assert!(reference.sentences.len() >= 8);
    let tokenizer = MiniLmTokenizer::from_file(&model_dir()?.join("tokenizer.json"), 256)?;
    let batch = tokenizer.encode(&reference.texts())?;
    for (name, ours) in [
        ("input_ids", &batch.input_ids),
        ("attention_mask", &batch.attention_mask),
        ("token_type_ids", &batch.token_type_ids),
    ] {
        let expected = reference.get(name)?;
        assert_eq!(ours.size(), expected.size(), "{name} shape");
        assert!(ours.equal(expected), "{name} differs from the reference");
    }
    // The batch is padded to the longest text, and the longest is truncated at 256.
    assert_eq!(batch.seq_len(), 256);
    Ok(())
}

/// Embeds the reference sentences as one padded batch; returns (worst cosine, max abs error).
fn compare(core_attention: &str) -> anyhow::Result<(f64, f64)> {
    let reference = Reference::load()?;
    let model = MiniLm::load(&model_dir()?, core_attention, Device::Cpu)?;
    assert_eq!(
        model.encoder().attention(0).map(|a| a.core_attention().kind()),
        Some(core_attention)
    );
    let ours = model.embed(&reference.texts())?;
    let expected = reference.get("embeddings")?.to_kind(Kind::Float);
    assert_eq!(ours.size(), expected.size());
    let cosine = (&ours * &expected).sum_dim_intlist(1, false, Kind::Double)
        / (ours.norm_scalaropt_dim(2, [1], false) * expected.norm_scalaropt_dim(2, [1], false))
            .to_kind(Kind::Double);
    let worst_cosine = cosine.min().double_value(&[]);
    let max_abs = (&ours - &expected).abs().max().double_value(&[]);
    println!(
        "{core_attention}: {} sentences, worst cosine {worst_cosine:.9}, max abs error {max_abs:.3e}",
        reference.sentences.len()
    );
    for (i, s) in reference.sentences.iter().enumerate() {
        let c = cosine.double_value(&[i as i64]);
        assert!(c >= MIN_COSINE, "{core_attention}: sentence {i} {s:?}: cosine {c}");
    }
    assert!(max_abs <= MAX_ABS_ERR, "{core_attention}: max abs error {max_abs}");
    Ok((worst_cosine, max_abs))
}

#[test]
fn embeddings_match_reference_dot_product_attention() -> anyhow::Result<()> {
    compare("dot-product-attention")?;
    Ok(())
}

#[test]
fn embeddings_match_reference_sdpa() -> anyhow::Result<()> {
    compare("sdpa")?;
    Ok(())
}

#[test]
fn padding_does_not_change_embeddings() -> anyhow::Result<()> {
    // Each sentence alone (no padding) against the padded batch of all of them.
    let reference = Reference::load()?;
    let model = MiniLm::load(&model_dir()?, minilm::DEFAULT_CORE_ATTENTION, Device::Cpu)?;
    let texts = reference.texts();
    let batched = model.embed(&texts)?;
    for (i, text) in texts.iter().enumerate() {
        let alone = model.embed(&[text])?;
        let err = (alone.get(0) - batched.get(i as i64)).abs().max().double_value(&[]);
        assert!(err <= 1e-5, "sentence {i}: alone vs batched differ by {err}");
    }
    Ok(())
}

#[test]
fn similar_sentences_are_closer() -> anyhow::Result<()> {
    let model = MiniLm::load(&model_dir()?, minilm::DEFAULT_CORE_ATTENTION, Device::Cpu)?;
    let e =
        model.embed(&["A man is eating food.", "A man is eating a meal.", "The sky is blue."])?;
    let sim = minilm::cosine_matrix(&e)?;
    assert_eq!(sim.size(), [3, 3]);
    assert!(sim.double_value(&[0, 1]) > sim.double_value(&[0, 2]) + 0.3);
    assert!((sim.double_value(&[2, 2]) - 1.0).abs() < 1e-5);
    Ok(())
}

#[test]
fn empty_input_is_a_typed_error() -> anyhow::Result<()> {
    let model = MiniLm::load(&model_dir()?, "sdpa", Device::Cpu)?;
    assert!(matches!(model.embed(&[]), Err(Error::EmptyInput)));
    assert!(matches!(model.tokenize(&[]), Err(Error::EmptyInput)));
    // A hand-made batch out of the vocabulary is refused before any kernel runs.
    let mut batch = model.tokenize(&["hello"])?;
    batch.input_ids = batch.input_ids.fill(1_000_000);
    match model.embed_batch(&batch) {
        Err(Error::Input { name: "input_ids", .. }) => {}
        other => anyhow::bail!("expected an input_ids error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn unknown_core_attention_is_a_spec_error() -> anyhow::Result<()> {
    match minilm::model_spec("no-such-attention") {
        Err(Error::Spec(e)) => assert!(e.to_string().contains("no-such-attention"), "{e}"),
        other => anyhow::bail!("expected a spec error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_or_misshaped_weights_name_the_tensor() -> anyhow::Result<()> {
    let tensors = hf_tensors()?;
    let build = |t: &HashMap<String, Tensor>| Encoder::from_tensors(t, "sdpa", Device::Cpu);
    build(&tensors)?;

    // An attention weight, missing: the conversion names it.
    let name = "encoder.layer.3.attention.self.key.weight";
    match build(&edited(&tensors, name, None)) {
        Err(Error::Convert(ConvertError::Missing(n))) => assert_eq!(n, name),
        other => anyhow::bail!("expected Convert(Missing({name})), got {other:?}"),
    }
    // An attention weight, mis-shaped.
    let name = "encoder.layer.0.attention.self.query.weight";
    let bad = Tensor::zeros([383, 384], (Kind::Float, Device::Cpu));
    match build(&edited(&tensors, name, Some(bad))) {
        Err(Error::Convert(ConvertError::Shape { name: n, got, .. })) => {
            assert_eq!((n.as_str(), got), (name, vec![383, 384]));
        }
        other => anyhow::bail!("expected Convert(Shape({name})), got {other:?}"),
    }
    // The attention output bias, missing: `hf_to_megatron` skips an absent `output.dense.bias`,
    // so the strict load reports the Megatron parameter it would have filled.
    let name = "encoder.layer.1.attention.output.dense.bias";
    match build(&edited(&tensors, name, None)) {
        Err(Error::Load(LoadError::Missing { name: n, .. })) => {
            assert_eq!(n, "layers.1.self_attention.linear_proj.bias");
        }
        other => anyhow::bail!("expected Load(Missing), got {other:?}"),
    }
    // Weights around the attention, missing and mis-shaped.
    for name in ["embeddings.LayerNorm.bias", "encoder.layer.5.output.LayerNorm.weight"] {
        match build(&edited(&tensors, name, None)) {
            Err(Error::MissingTensor { name: n }) => assert_eq!(n, name),
            other => anyhow::bail!("expected MissingTensor({name}), got {other:?}"),
        }
    }
    let name = "encoder.layer.2.output.dense.weight";
    let bad = Tensor::zeros([384, 1535], (Kind::Float, Device::Cpu));
    match build(&edited(&tensors, name, Some(bad))) {
        Err(e @ Error::TensorShape { .. }) => {
            let message = e.to_string();
            assert!(message.contains(name) && message.contains("[384, 1536]"), "{message}");
        }
        other => anyhow::bail!("expected TensorShape({name}), got {other:?}"),
    }
    Ok(())
}
