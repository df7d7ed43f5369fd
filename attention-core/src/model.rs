//! Every layer of a model file, built into one `VarStore`.

use attention_spec::{Model, SpecError};
use tch::nn;

use crate::attention::Attention;

/// The attentions of a resolved [`Model`], in file order, with the path prefix their
/// parameters live under.
#[derive(Debug)]
pub struct BuiltLayers {
    /// `(global layer number, parameter prefix, attention)`.
    pub layers: Vec<(i64, String, Attention)>,
}

impl BuiltLayers {
    /// Builds every layer of `model` under `path`. Layer `n`'s parameters are named
    /// `layers.{n-1}.self_attention.*` (or `cross_attention`), following the layout of
    /// Megatron's `decoder.layers.{i}` state dict.
    pub fn build(path: &nn::Path<'_>, model: &Model) -> Result<Self, SpecError> {
        let mut layers = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            let slot = match layer.attention.module() {
                attention_spec::spec::AttentionModule::SelfAttention => "self_attention",
                attention_spec::spec::AttentionModule::CrossAttention => "cross_attention",
            };
            let prefix = format!("layers.{}.{slot}", layer.layer_number - 1);
            let p = path / "layers" / (layer.layer_number - 1) / slot;
            let attention =
                Attention::build(&p, &model.config, &layer.attention, layer.layer_number)?;
            layers.push((layer.layer_number, prefix, attention));
        }
        Ok(Self { layers })
    }
}
