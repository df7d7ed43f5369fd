//! Hugging Face ↔ Megatron attention weights: exact round trips for BERT-style and
//! Llama/Qwen-style checkpoints (MHA, GQA, MQA; with and without biases and Q/K norms), the
//! fused layout row by row, and typed errors naming the tensor.

use std::collections::HashMap;

use anyhow::{Result, bail};
use attention_core::convert::{
    AttentionDims, ConvertError, HfLayout, hf_to_megatron, megatron_to_hf,
};
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn hf_layer(
    layout: HfLayout,
    d: AttentionDims,
    h: i64,
    bias: bool,
    norms: bool,
    prefix: &str,
) -> HashMap<String, Tensor> {
    let (nh, ng, hn) = (d.num_attention_heads, d.num_query_groups, d.kv_channels);
    let names = match layout {
        HfLayout::Bert => ["self.query", "self.key", "self.value", "output.dense"],
        HfLayout::Llama => ["q_proj", "k_proj", "v_proj", "o_proj"],
    };
    let rows = [nh * hn, ng * hn, ng * hn];
    let mut m = HashMap::new();
    for (n, r) in names.iter().zip(rows) {
        m.insert(format!("{prefix}{n}.weight"), randn(&[r, h]));
        if bias {
            m.insert(format!("{prefix}{n}.bias"), randn(&[r]));
        }
    }
    m.insert(format!("{prefix}{}.weight", names[3]), randn(&[h, nh * hn]));
    if bias {
        m.insert(format!("{prefix}{}.bias", names[3]), randn(&[h]));
    }
    if norms {
        m.insert(format!("{prefix}q_norm.weight"), randn(&[hn]));
        m.insert(format!("{prefix}k_norm.weight"), randn(&[hn]));
    }
    m
}

#[test]
fn round_trips_are_exact() -> Result<()> {
    for layout in [HfLayout::Bert, HfLayout::Llama] {
        for (nh, ng) in [(4, 4), (8, 2), (4, 1)] {
            for bias in [false, true] {
                let norms = layout == HfLayout::Llama && !bias;
                let d =
                    AttentionDims { num_attention_heads: nh, num_query_groups: ng, kv_channels: 8 };
                let hf = hf_layer(layout, d, 24, bias, norms, "model.layers.3.self_attn.");
                let mut mg = HashMap::new();
                hf_to_megatron(
                    layout,
                    d,
                    &hf,
                    "model.layers.3.self_attn.",
                    "decoder.layers.3.self_attention.",
                    &mut mg,
                )?;
                let mut back = HashMap::new();
                megatron_to_hf(
                    layout,
                    d,
                    &mg,
                    "decoder.layers.3.self_attention.",
                    "model.layers.3.self_attn.",
                    &mut back,
                )?;
                if back.len() != hf.len() {
                    bail!(
                        "{layout:?} {nh}/{ng} bias {bias}: {} tensors back, {} in",
                        back.len(),
                        hf.len()
                    );
                }
                for (name, t) in &hf {
                    let b = back.get(name).ok_or_else(|| anyhow::anyhow!("{name} lost"))?;
                    if !b.equal(t) {
                        bail!("{name} changed in the round trip");
                    }
                }
                // The fused rows: group g holds its query heads, then its key head, then its value head.
                let (q, k, v) = match layout {
                    HfLayout::Bert => ("self.query", "self.key", "self.value"),
                    HfLayout::Llama => ("q_proj", "k_proj", "v_proj"),
                };
                let w = &mg["decoder.layers.3.self_attention.linear_qkv.weight"];
                let p = nh / ng;
                for g in 0..ng {
                    let base = g * (p + 2) * 8;
                    let hf_w = |n: &str| {
                        hf[&format!("model.layers.3.self_attn.{n}.weight")].shallow_clone()
                    };
                    assert!(w.narrow(0, base, p * 8).equal(&hf_w(q).narrow(0, g * p * 8, p * 8)));
                    assert!(w.narrow(0, base + p * 8, 8).equal(&hf_w(k).narrow(0, g * 8, 8)));
                    assert!(w.narrow(0, base + (p + 1) * 8, 8).equal(&hf_w(v).narrow(0, g * 8, 8)));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn missing_and_misshaped_tensors_are_named() -> Result<()> {
    let d = AttentionDims { num_attention_heads: 4, num_query_groups: 2, kv_channels: 8 };
    let p = "encoder.layer.0.attention.";
    let full = hf_layer(HfLayout::Bert, d, 32, true, false, p);
    let mut out = HashMap::new();
    let mut m = full.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect::<HashMap<_, _>>();
    m.remove(&format!("{p}self.value.weight"));
    assert_eq!(
        hf_to_megatron(HfLayout::Bert, d, &m, p, "", &mut out),
        Err(ConvertError::Missing(format!("{p}self.value.weight")))
    );
    let mut m = full.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect::<HashMap<_, _>>();
    m.remove(&format!("{p}self.key.bias"));
    assert_eq!(
        hf_to_megatron(HfLayout::Bert, d, &m, p, "", &mut out),
        Err(ConvertError::Missing(format!("{p}self.key.bias")))
    );
    let mut m = full.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect::<HashMap<_, _>>();
    m.insert(format!("{p}self.key.weight"), randn(&[32, 32]));
    match hf_to_megatron(HfLayout::Bert, d, &m, p, "", &mut out) {
        Err(ConvertError::Shape { name, expected, got })
            if name == format!("{p}self.key.weight") && expected == [16, 32] && got == [32, 32] => {
        }
        other => bail!("unexpected {other:?}"),
    }
    assert!(out.is_empty(), "a failed conversion inserted tensors");
    let bad = AttentionDims { num_attention_heads: 6, num_query_groups: 4, kv_channels: 8 };
    assert!(matches!(
        hf_to_megatron(HfLayout::Bert, bad, &full, p, "", &mut out),
        Err(ConvertError::Invalid(_))
    ));
    // Megatron side: a missing fused weight, and Q/K norms that BERT has no place for.
    assert_eq!(
        megatron_to_hf(HfLayout::Llama, d, &HashMap::new(), "x.", "y.", &mut out),
        Err(ConvertError::Missing("x.linear_qkv.weight".into()))
    );
    let mut mg = HashMap::new();
    hf_to_megatron(HfLayout::Bert, d, &full, p, "", &mut mg)?;
    mg.insert("q_layernorm.weight".into(), randn(&[8]));
    assert!(matches!(
        megatron_to_hf(HfLayout::Bert, d, &mg, "", p, &mut out),
        Err(ConvertError::Invalid(_))
    ));
    Ok(())
}
