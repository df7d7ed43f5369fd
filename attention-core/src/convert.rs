//! Hugging Face ↔ Megatron attention weights.
//!
//! Hugging Face checkpoints keep query, key and value projections apart; Megatron fuses them
//! into one `linear_qkv` grouped per key/value group (for each group: its query heads, its key
//! head, its value head). This module converts one layer's attention either way, exactly (the
//! round trip HF → Megatron → HF gives back the same tensors):
//!
//! | Megatron | BERT-style (`hf_prefix` = `encoder.layer.{i}.attention.`) | Llama/Qwen-style (`model.layers.{i}.self_attn.`) |
//! |---|---|---|
//! | `linear_qkv.weight` / `.bias` | `self.query`, `self.key`, `self.value` `.weight` / `.bias` | `q_proj`, `k_proj`, `v_proj` `.weight` / `.bias` |
//! | `linear_proj.weight` / `.bias` | `output.dense.weight` / `.bias` | `o_proj.weight` / `.bias` |
//! | `q_layernorm.weight`, `k_layernorm.weight` | — | `q_norm.weight`, `k_norm.weight` |
//!
//! Biases and Q/K norms are converted when present (on either side); a missing weight, or a
//! bias present for only some of q/k/v, is an error naming the tensor. BERT's
//! `attention.output.LayerNorm` belongs to the layer around the attention, not to it. Rotary
//! layouts need no permutation: Hugging Face's rotate-half convention is Megatron's
//! `rotary_interleaved = false`.

use std::collections::HashMap;

use tch::Tensor;

/// Which Hugging Face naming an attention uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfLayout {
    /// `self.query` / `self.key` / `self.value` / `output.dense` (BERT, RoBERTa, MiniLM).
    Bert,
    /// `q_proj` / `k_proj` / `v_proj` / `o_proj` / `q_norm` / `k_norm` (Llama, Mistral, Qwen).
    Llama,
}

impl HfLayout {
    fn names(self) -> [&'static str; 4] {
        match self {
            Self::Bert => ["self.query", "self.key", "self.value", "output.dense"],
            Self::Llama => ["q_proj", "k_proj", "v_proj", "o_proj"],
        }
    }
}

/// Head sizes of the attention being converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads.
    pub num_query_groups: i64,
    /// Head dimension.
    pub kv_channels: i64,
}

/// Why a conversion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// A tensor the conversion needs is absent.
    #[error("missing tensor `{0}`")]
    Missing(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// What the dims require.
        expected: Vec<i64>,
        /// What it has.
        got: Vec<i64>,
    },
    /// Inconsistent sizes or a partial set of optional tensors.
    #[error("{0}")]
    Invalid(String),
}

fn get<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor, ConvertError> {
    map.get(name).ok_or_else(|| ConvertError::Missing(name.to_string()))
}

fn expect_shape(name: &str, t: &Tensor, expected: &[i64]) -> Result<(), ConvertError> {
    if t.size() == expected {
        Ok(())
    } else {
        Err(ConvertError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: t.size(),
        })
    }
}

impl AttentionDims {
    fn check(&self) -> Result<(i64, i64, i64, i64), ConvertError> {
        let (nh, ng, hn) = (self.num_attention_heads, self.num_query_groups, self.kv_channels);
        if nh < 1 || ng < 1 || hn < 1 || nh % ng != 0 {
            return Err(ConvertError::Invalid(format!(
                "heads {nh}, query groups {ng}, kv_channels {hn}: need positive sizes with heads a multiple of groups"
            )));
        }
        Ok((nh, ng, hn, nh / ng))
    }
}

/// Fuses separate q, k, v (rows `[nh·hn]`, `[ng·hn]`, `[ng·hn]`, any trailing dims) into
/// Megatron's grouped layout.
fn fuse(q: &Tensor, k: &Tensor, v: &Tensor, (ng, hn, p): (i64, i64, i64)) -> Tensor {
    let rest: Vec<i64> = q.size()[1..].to_vec();
    let shape = |rows: i64| -> Vec<i64> {
        [ng, rows].iter().copied().chain(rest.iter().copied()).collect()
    };
    let q = q.reshape(shape(p * hn));
    let k = k.reshape(shape(hn));
    let v = v.reshape(shape(hn));
    let fused: Vec<i64> = [ng * (p + 2) * hn].iter().copied().chain(rest.iter().copied()).collect();
    Tensor::cat(&[q, k, v], 1).reshape(fused)
}

/// Splits Megatron's grouped rows back into q, k, v.
fn split(qkv: &Tensor, (ng, hn, p): (i64, i64, i64)) -> (Tensor, Tensor, Tensor) {
    let rest: Vec<i64> = qkv.size()[1..].to_vec();
    let grouped: Vec<i64> =
        [ng, (p + 2) * hn].iter().copied().chain(rest.iter().copied()).collect();
    let parts = qkv.reshape(grouped).split_with_sizes([p * hn, hn, hn], 1);
    let flat = |t: &Tensor, rows: i64| -> Tensor {
        t.reshape([ng * rows].iter().copied().chain(rest.iter().copied()).collect::<Vec<_>>())
    };
    (flat(&parts[0], p * hn), flat(&parts[1], hn), flat(&parts[2], hn))
}

/// Converts one layer's Hugging Face attention tensors (`hf_prefix` + name) into Megatron's
/// (`mg_prefix` + state-dict name), inserting them into `out`.
pub fn hf_to_megatron(
    layout: HfLayout,
    dims: AttentionDims,
    hf: &HashMap<String, Tensor>,
    hf_prefix: &str,
    mg_prefix: &str,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), ConvertError> {
    let (nh, ng, hn, p) = dims.check()?;
    let [qn, kn, vn, on] = layout.names();
    let name = |n: &str, w: &str| format!("{hf_prefix}{n}.{w}");
    let (q, k, v) = (
        get(hf, &name(qn, "weight"))?,
        get(hf, &name(kn, "weight"))?,
        get(hf, &name(vn, "weight"))?,
    );
    let hidden = q.size().get(1).copied().unwrap_or(0);
    expect_shape(&name(qn, "weight"), q, &[nh * hn, hidden])?;
    expect_shape(&name(kn, "weight"), k, &[ng * hn, hidden])?;
    expect_shape(&name(vn, "weight"), v, &[ng * hn, hidden])?;
    let o = get(hf, &name(on, "weight"))?;
    expect_shape(&name(on, "weight"), o, &[o.size().first().copied().unwrap_or(0), nh * hn])?;
    let mut result = vec![
        (format!("{mg_prefix}linear_qkv.weight"), fuse(q, k, v, (ng, hn, p))),
        (format!("{mg_prefix}linear_proj.weight"), o.shallow_clone()),
    ];
    let biases: Vec<Option<&Tensor>> =
        [qn, kn, vn].iter().map(|n| hf.get(&name(n, "bias"))).collect();
    match biases.as_slice() {
        [Some(qb), Some(kb), Some(vb)] => {
            expect_shape(&name(qn, "bias"), qb, &[nh * hn])?;
            expect_shape(&name(kn, "bias"), kb, &[ng * hn])?;
            expect_shape(&name(vn, "bias"), vb, &[ng * hn])?;
            result.push((format!("{mg_prefix}linear_qkv.bias"), fuse(qb, kb, vb, (ng, hn, p))));
        }
        [None, None, None] => {}
        _ => {
            let missing = [qn, kn, vn]
                .iter()
                .zip(&biases)
                .find(|(_, b)| b.is_none())
                .map(|(n, _)| name(n, "bias"));
            return Err(ConvertError::Missing(missing.unwrap_or_default()));
        }
    }
    if let Some(b) = hf.get(&name(on, "bias")) {
        result.push((format!("{mg_prefix}linear_proj.bias"), b.shallow_clone()));
    }
    if layout == HfLayout::Llama {
        for (hf_norm, mg_norm) in [("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")] {
            if let Some(w) = hf.get(&name(hf_norm, "weight")) {
                expect_shape(&name(hf_norm, "weight"), w, &[hn])?;
                result.push((format!("{mg_prefix}{mg_norm}.weight"), w.shallow_clone()));
            }
        }
    }
    out.extend(result);
    Ok(())
}

/// The inverse of [`hf_to_megatron`].
pub fn megatron_to_hf(
    layout: HfLayout,
    dims: AttentionDims,
    mg: &HashMap<String, Tensor>,
    mg_prefix: &str,
    hf_prefix: &str,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), ConvertError> {
    let (nh, ng, hn, p) = dims.check()?;
    let [qn, kn, vn, on] = layout.names();
    let hf_name = |n: &str, w: &str| format!("{hf_prefix}{n}.{w}");
    let mg_name = |n: &str| format!("{mg_prefix}{n}");
    let qkv = get(mg, &mg_name("linear_qkv.weight"))?;
    let hidden = qkv.size().get(1).copied().unwrap_or(0);
    expect_shape(&mg_name("linear_qkv.weight"), qkv, &[(nh + 2 * ng) * hn, hidden])?;
    let proj = get(mg, &mg_name("linear_proj.weight"))?;
    expect_shape(
        &mg_name("linear_proj.weight"),
        proj,
        &[proj.size().first().copied().unwrap_or(0), nh * hn],
    )?;
    let (q, k, v) = split(qkv, (ng, hn, p));
    let mut result = vec![
        (hf_name(qn, "weight"), q),
        (hf_name(kn, "weight"), k),
        (hf_name(vn, "weight"), v),
        (hf_name(on, "weight"), proj.shallow_clone()),
    ];
    if let Some(b) = mg.get(&mg_name("linear_qkv.bias")) {
        expect_shape(&mg_name("linear_qkv.bias"), b, &[(nh + 2 * ng) * hn])?;
        let (qb, kb, vb) = split(b, (ng, hn, p));
        result.extend([
            (hf_name(qn, "bias"), qb),
            (hf_name(kn, "bias"), kb),
            (hf_name(vn, "bias"), vb),
        ]);
    }
    if let Some(b) = mg.get(&mg_name("linear_proj.bias")) {
        result.push((hf_name(on, "bias"), b.shallow_clone()));
    }
    for (mg_norm, hf_norm) in [("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")] {
        if let Some(w) = mg.get(&mg_name(&format!("{mg_norm}.weight"))) {
            if layout != HfLayout::Llama {
                return Err(ConvertError::Invalid(format!(
                    "{mg_prefix}{mg_norm}.weight has no BERT-style counterpart"
                )));
            }
            if mg.contains_key(&mg_name(&format!("{mg_norm}.bias"))) {
                return Err(ConvertError::Invalid(format!(
                    "{mg_prefix}{mg_norm}.bias: Llama-style q/k norms are RMSNorms without a bias"
                )));
            }
            result.push((hf_name(hf_norm, "weight"), w.shallow_clone()));
        }
    }
    out.extend(result);
    Ok(())
}
