//! The BERT encoder of all-MiniLM-L6-v2 around the project's [`SelfAttention`].
//!
//! The attention of every layer is built from [`MODEL_TOML`] through the spec machinery
//! (`ModelSpec` → `Model` → [`BuiltLayers`]) and loaded from the Hugging Face checkpoint with
//! [`hf_to_megatron`] and [`load_named`]. Everything else is BERT's and lives here:
//!
//! ```text
//! embeddings:  LayerNorm(word[ids] + token_type[types] + position[0..s])
//! each layer:  a = attention(x, padding mask) + attention bias      (dropout-free)
//!              x = LayerNorm(a + x)                                  attention.output.LayerNorm
//!              x = LayerNorm(output.dense(gelu(intermediate.dense(x))) + x)   output.LayerNorm
//! ```
//!
//! GELU is the exact (erf) one, as BERT's `hidden_act = "gelu"`. Every LayerNorm uses the
//! model file's `layernorm_epsilon` (1e-12).

use std::collections::HashMap;

use attention_core::convert::{AttentionDims, HfLayout, hf_to_megatron};
use attention_core::weights::load_named;
use attention_core::{Attention, AttentionInput, BuiltLayers, SelfAttention};
use attention_spec::spec::SlotSpec;
use attention_spec::{AttentionSpec, Model, ModelSpec, TransformerConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::{Batch, Error};

/// The model file of the attention (`src/minilm.toml`): `[transformer]` with MiniLM's sizes
/// and `[attention] preset = "gpt-local"` with a padding mask.
pub const MODEL_TOML: &str = include_str!("minilm.toml");

/// The core attention kind used unless another is asked for.
pub const DEFAULT_CORE_ATTENTION: &str = "dot-product-attention";

/// Parses [`MODEL_TOML`], puts `core_attention` (a registered kind such as
/// `"dot-product-attention"` or `"sdpa"`) into the attention's `core_attention` slot and
/// resolves it against the global registry.
pub fn model_spec(core_attention: &str) -> Result<Model, Error> {
    let mut spec = ModelSpec::from_toml_str(MODEL_TOML)?;
    spec.attention
        .get_or_insert_with(|| AttentionSpec::preset("gpt-local"))
        .submodules
        .insert("core_attention".into(), SlotSpec::Kind(core_attention.into()));
    Ok(spec.resolve(attention_core::registry()?)?)
}

/// The Hugging Face name prefix of layer `i` (0-based).
fn hf_layer(i: usize) -> String {
    format!("encoder.layer.{i}.")
}

/// Reads tensors by Hugging Face name, checking shapes (`-1` = any size), converting them to
/// the parameters' dtype and device.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    kind: Kind,
    device: Device,
}

impl Weights<'_> {
    fn get(&self, name: &str, expected: &[i64]) -> Result<Tensor, Error> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string() })?;
        let got = t.size();
        let fits = got.len() == expected.len()
            && got.iter().zip(expected).all(|(&g, &e)| e < 0 || g == e)
            && got.iter().all(|&g| g > 0);
        if !fits {
            let dims: Vec<String> =
                expected.iter().map(|&e| if e < 0 { "?".into() } else { e.to_string() }).collect();
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: format!("[{}]", dims.join(", ")),
                got,
            });
        }
        Ok(t.f_to_kind(self.kind)?.f_to_device(self.device)?.f_detach()?)
    }

    fn layer_norm(&self, prefix: &str, hidden: i64, eps: f64) -> Result<LayerNorm, Error> {
        Ok(LayerNorm {
            weight: self.get(&format!("{prefix}.weight"), &[hidden])?,
            bias: self.get(&format!("{prefix}.bias"), &[hidden])?,
            eps,
        })
    }

    fn dense(&self, prefix: &str, out: i64, input: i64) -> Result<Dense, Error> {
        Ok(Dense {
            weight: self.get(&format!("{prefix}.weight"), &[out, input])?,
            bias: self.get(&format!("{prefix}.bias"), &[out])?,
        })
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.weight.size()[0];
        x.layer_norm([h], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// `torch.nn.Linear` with a bias.
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// BERT's embeddings: word + token type + learned absolute position, then LayerNorm.
#[derive(Debug)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

/// One BERT layer: the project's attention, then BERT's post-LayerNorm residual blocks.
#[derive(Debug)]
struct EncoderLayer {
    attention: SelfAttention,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
}

impl EncoderLayer {
    /// `x` `[s, b, h]`, `mask` bool `[b, 1, 1, s]` (true = padding key) → `[s, b, h]`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor, Error> {
        // 1. Attention; its linear_proj bias comes back separately (bias-dropout-add).
        let out = self.attention.forward(&AttentionInput::new(x).with_mask(mask))?;
        let attended = match &out.bias {
            Some(bias) => out.output + bias,
            None => out.output,
        };
        // 2. Residual and post-LayerNorm (BertSelfOutput).
        let x = self.attention_norm.forward(&(attended + x));
        // 3. MLP with exact GELU, residual, post-LayerNorm (BertIntermediate + BertOutput).
        let h = self.intermediate.forward(&x).gelu("none");
        let y = self.output.forward(&h);
        Ok(self.output_norm.forward(&(y + &x)))
    }
}

/// The 6-layer encoder: embeddings and layers, weights loaded, ready for inference.
#[derive(Debug)]
pub struct Encoder {
    config: TransformerConfig,
    /// Holds the attentions' parameters (`layers.{i}.self_attention.*`).
    vs: VarStore,
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    /// Builds the encoder with the given core attention kind on `device` and loads it from
    /// Hugging Face `BertModel` tensors (`embeddings.*`, `encoder.layer.{i}.*`; anything else,
    /// such as `pooler.*` or the `embeddings.position_ids` buffer, is ignored).
    ///
    /// Each layer's attention tensors are converted with [`hf_to_megatron`] and loaded
    /// strictly with [`load_named`]; a missing or mis-shaped tensor is an error naming it
    /// ([`Error::Convert`], [`Error::Load`] for the Megatron name of a missing
    /// `attention.output.dense.bias`, [`Error::MissingTensor`], [`Error::TensorShape`]).
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        core_attention: &str,
        device: Device,
    ) -> Result<Self, Error> {
        let model = model_spec(core_attention)?;
        let config = model.config.clone();
        let h = config.hidden_size;

        // 1. The attentions, built from the spec under `layers.{i}.self_attention`.
        let mut vs = VarStore::new(device);
        let built = BuiltLayers::build(&vs.root(), &model)?;
        let dims = AttentionDims {
            num_attention_heads: config.num_attention_heads,
            num_query_groups: config.num_query_groups,
            kv_channels: config.kv_channels,
        };
        let mut converted = HashMap::new();
        for (i, (_, prefix, _)) in built.layers.iter().enumerate() {
            let hf_prefix = format!("{}attention.", hf_layer(i));
            let mg_prefix = format!("{prefix}.");
            hf_to_megatron(HfLayout::Bert, dims, tensors, &hf_prefix, &mg_prefix, &mut converted)?;
        }
        load_named(&vs, &converted, "", true)?;
        vs.freeze();

        // 2. Everything around them, read by name.
        let w = Weights { tensors, kind: config.params_dtype.kind(), device };
        let eps = config.layernorm_epsilon;
        let embeddings = Embeddings {
            word: w.get("embeddings.word_embeddings.weight", &[-1, h])?,
            position: w.get("embeddings.position_embeddings.weight", &[-1, h])?,
            token_type: w.get("embeddings.token_type_embeddings.weight", &[-1, h])?,
            norm: w.layer_norm("embeddings.LayerNorm", h, eps)?,
        };
        let mut layers = Vec::with_capacity(built.layers.len());
        for (i, (layer_number, _, attention)) in built.layers.into_iter().enumerate() {
            let Attention::SelfAttention(attention) = attention else {
                return Err(Error::Unsupported {
                    reason: format!(
                        "layer {layer_number} is a cross attention; BERT layers need self attention"
                    ),
                });
            };
            let p = hf_layer(i);
            let ffn_name = format!("{p}intermediate.dense.weight");
            let ffn = w.get(&ffn_name, &[-1, h])?.size()[0];
            layers.push(EncoderLayer {
                attention,
                attention_norm: w.layer_norm(&format!("{p}attention.output.LayerNorm"), h, eps)?,
                intermediate: w.dense(&format!("{p}intermediate.dense"), ffn, h)?,
                output: w.dense(&format!("{p}output.dense"), h, ffn)?,
                output_norm: w.layer_norm(&format!("{p}output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self { config, vs, embeddings, layers })
    }

    /// The resolved `[transformer]` config of [`MODEL_TOML`].
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`'s (0-based) attention.
    pub fn attention(&self, i: usize) -> Option<&SelfAttention> {
        self.layers.get(i).map(|l| &l.attention)
    }

    /// The longest sequence the position table covers.
    pub fn max_positions(&self) -> i64 {
        self.embeddings.position.size()[0]
    }

    /// The last hidden state of a batch (BERT's `last_hidden_state`); run it under
    /// `tch::no_grad` for inference. Padding positions hold values too; pool with the mask.
    ///
    /// # Shapes
    /// `input_ids`, `attention_mask`, `token_type_ids` int64 `[n, s]` (any device) →
    /// `[n, s, 384]` on [`device`](Self::device).
    pub fn forward(&self, batch: &Batch) -> Result<Tensor, Error> {
        let (n, s) = self.check(batch)?;
        let device = self.device();
        let ids = batch.input_ids.f_to_device(device)?;
        let types = batch.token_type_ids.f_to_device(device)?;
        let keep = batch.attention_mask.f_to_device(device)?;
        // 1. Embeddings [n, s, h] -> sequence-first [s, n, h].
        let e = &self.embeddings;
        let positions = Tensor::f_arange(s, (Kind::Int64, device))?;
        let x = Tensor::embedding(&e.word, &ids, -1, false, false)
            + Tensor::embedding(&e.token_type, &types, -1, false, false)
            + Tensor::embedding(&e.position, &positions, -1, false, false).unsqueeze(0);
        let mut x = e.norm.forward(&x).transpose(0, 1).contiguous();
        // 2. Megatron's padding mask: bool [n, 1, 1, s], true = padding key.
        let mask = keep.eq(0).view([n, 1, 1, s]);
        // 3. The layers, [s, n, h] -> [s, n, h].
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        // 4. Back to batch-first [n, s, h].
        Ok(x.transpose(0, 1).contiguous())
    }

    /// Validates a batch before any kernel runs; returns `(n, s)`.
    fn check(&self, batch: &Batch) -> Result<(i64, i64), Error> {
        let shape = batch.input_ids.size();
        let &[n, s] = shape.as_slice() else {
            return Err(Error::Input {
                name: "input_ids",
                reason: format!("expected [n, s], got {shape:?}"),
            });
        };
        if n < 1 || s < 1 {
            return Err(Error::Input {
                name: "input_ids",
                reason: format!("empty batch {shape:?}"),
            });
        }
        if s > self.max_positions() {
            return Err(Error::Input {
                name: "input_ids",
                reason: format!("{s} tokens, the position table has {}", self.max_positions()),
            });
        }
        let limits = [
            ("input_ids", &batch.input_ids, self.embeddings.word.size()[0]),
            ("token_type_ids", &batch.token_type_ids, self.embeddings.token_type.size()[0]),
            ("attention_mask", &batch.attention_mask, 2),
        ];
        for (name, t, bound) in limits {
            if t.size() != shape {
                return Err(Error::Input {
                    name,
                    reason: format!("expected shape {shape:?} (as input_ids), got {:?}", t.size()),
                });
            }
            if t.kind() != Kind::Int64 {
                return Err(Error::Input {
                    name,
                    reason: format!("expected int64, got {:?}", t.kind()),
                });
            }
            let (lo, hi) = (t.f_min()?.f_int64_value(&[])?, t.f_max()?.f_int64_value(&[])?);
            if lo < 0 || hi >= bound {
                return Err(Error::Input {
                    name,
                    reason: format!("values must lie in 0..{bound}, got {lo}..={hi}"),
                });
            }
        }
        Ok((n, s))
    }
}

/// Mean of the hidden states over the real tokens of each row (sentence-transformers'
/// mean pooling: the sum over positions with mask 1, divided by their count, at least 1e-9).
///
/// # Shapes
/// `hidden` `[n, s, h]`, `attention_mask` `[n, s]` (0/1, any numeric dtype) → `[n, h]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor, Error> {
    let (hs, ms) = (hidden.size(), attention_mask.size());
    if hs.len() != 3 || ms.len() != 2 || hs[..2] != ms[..] {
        return Err(Error::Input {
            name: "attention_mask",
            reason: format!("expected hidden [n, s, h] and mask [n, s], got {hs:?} and {ms:?}"),
        });
    }
    let mask =
        attention_mask.f_to_device(hidden.device())?.f_to_kind(hidden.kind())?.f_unsqueeze(-1)?;
    let sum = hidden.f_mul(&mask)?.f_sum_dim_intlist(1, false, None::<Kind>)?;
    let count = mask.f_sum_dim_intlist(1, false, None::<Kind>)?.f_clamp_min(1e-9)?;
    Ok(sum.f_div(&count)?)
}

/// Rows divided by their L2 norm (at least 1e-12), as `torch.nn.functional.normalize`.
///
/// # Shapes
/// `[n, h]` → `[n, h]`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor, Error> {
    if x.dim() != 2 {
        return Err(Error::Input {
            name: "embeddings",
            reason: format!("expected [n, h], got {:?}", x.size()),
        });
    }
    let norm = x.f_norm_scalaropt_dim(2, [1], true)?.f_clamp_min(1e-12)?;
    Ok(x.f_div(&norm)?)
}

/// Pairwise cosine similarities of the rows of `embeddings`.
///
/// # Shapes
/// `[n, h]` → `[n, n]`.
///
/// ```
/// # fn main() -> Result<(), minilm::Error> {
/// let e = tch::Tensor::from_slice(&[1.0f32, 0.0, 3.0, 4.0]).view([2, 2]);
/// let c = minilm::cosine_matrix(&e)?;
/// assert!((c.double_value(&[0, 1]) - 0.6).abs() < 1e-6);
/// # Ok(())
/// # }
/// ```
pub fn cosine_matrix(embeddings: &Tensor) -> Result<Tensor, Error> {
    let unit = l2_normalize(embeddings)?;
    Ok(unit.f_matmul(&unit.f_transpose(0, 1)?)?)
}
