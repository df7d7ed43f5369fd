//! `[transformer]`: Megatron-Core `TransformerConfig` fields, as written in TOML
//! ([`TransformerConfigSpec`]) and resolved ([`TransformerConfig`]).
//!
//! Field names, types and defaults are Megatron-Core 0.19.2's dataclass defaults (not the
//! Megatron-LM command line's): `attention_dropout` is 0.1, `attention_softmax_in_fp32` is true,
//! `add_bias_linear` is true. `rotary_base`, `rotary_percent`, `seq_len_interpolation_factor`
//! and `position_embedding_type` are `GPTModel` arguments in Megatron; they live here because
//! they decide the rotary embedding the attention receives. Resolution repeats
//! `TransformerConfig.__post_init__` for these fields: `kv_channels` defaults to
//! `hidden_size // num_attention_heads`, `num_query_groups` to `num_attention_heads`,
//! `apply_query_key_layer_scaling` forces `attention_softmax_in_fp32`, and
//! `recompute_modules` defaults to `["core_attn"]`.

use serde::{Deserialize, Serialize};

use crate::error::{Place, Result, SpecError};

/// Normalization of the Q/K layernorms (Megatron `config.normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Normalization {
    /// `torch.nn.LayerNorm`: weight and bias.
    LayerNorm,
    /// `torch.nn.RMSNorm`: weight only.
    RMSNorm,
}

/// Data type of parameters (Megatron `params_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamsDtype {
    /// fp32, Megatron's default.
    #[serde(rename = "float32", alias = "fp32", alias = "float", alias = "torch.float32")]
    Float32,
    /// bf16.
    #[serde(rename = "bfloat16", alias = "bf16", alias = "torch.bfloat16")]
    BFloat16,
    /// fp16.
    #[serde(rename = "float16", alias = "fp16", alias = "half", alias = "torch.float16")]
    Float16,
}

impl ParamsDtype {
    /// The libtorch element kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::Float32 => tch::Kind::Float,
            Self::BFloat16 => tch::Kind::BFloat16,
            Self::Float16 => tch::Kind::Half,
        }
    }
}

/// Activation recompute granularity (Megatron `recompute_granularity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeGranularity {
    /// Recompute whole transformer layers (handled above the attention).
    Full,
    /// Recompute the modules listed in `recompute_modules`.
    Selective,
}

/// Position embedding of the model (Megatron `GPTModel(position_embedding_type=...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbeddingType {
    /// Learned absolute positions, added before the first layer: the attention sees none.
    LearnedAbsolute,
    /// Rotary embeddings, applied to queries and keys inside the attention.
    Rope,
    /// No position information.
    None,
}

/// Modules Megatron accepts in `recompute_modules` (`TransformerConfig.__post_init__`).
pub const RECOMPUTE_MODULES: &[&str] = &[
    "core_attn",
    "moe_act",
    "layernorm",
    "mla_up_proj",
    "mlp",
    "moe",
    "shared_experts",
    "gdn_norm_out",
];

fn default_attention_dropout() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}
fn default_layernorm_epsilon() -> f64 {
    1e-5
}
fn default_rotary_base() -> f64 {
    10000.0
}
fn default_one() -> f64 {
    1.0
}
fn default_normalization() -> Normalization {
    Normalization::LayerNorm
}
fn default_params_dtype() -> ParamsDtype {
    ParamsDtype::Float32
}
fn default_qk_clip_threshold() -> f64 {
    100.0
}
fn default_qk_clip_alpha() -> f64 {
    0.5
}
fn default_one_i64() -> i64 {
    1
}
fn default_init_method_std() -> f64 {
    0.02
}
fn default_position_embedding_type() -> PositionEmbeddingType {
    PositionEmbeddingType::LearnedAbsolute
}

/// `[transformer]` as written. Sizes are signed so that a zero or negative size is reported as
/// an invalid value rather than a decoding error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfigSpec {
    /// Number of transformer layers; default: the number of `[[layers]]`, or 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_layers: Option<i64>,
    /// Hidden size `h`. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<i64>,
    /// Number of query heads `nh`. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<i64>,
    /// Number of key/value heads `ng` (GQA when below `nh`); default `nh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_query_groups: Option<i64>,
    /// Head dimension `hn`; default `hidden_size // num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_channels: Option<i64>,
    /// Dropout on the attention probabilities; default 0.1.
    #[serde(default = "default_attention_dropout")]
    pub attention_dropout: f64,
    /// Softmax scale; default `1/sqrt(kv_channels)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_scale: Option<f64>,
    /// Scale Q·Kᵀ by 1/layer_number in the GEMM and back in an fp32 softmax; default false.
    #[serde(default)]
    pub apply_query_key_layer_scaling: bool,
    /// Masking and softmax in fp32 for fp16/bf16 inputs; default true.
    #[serde(default = "default_true")]
    pub attention_softmax_in_fp32: bool,
    /// Normalize queries and keys per head with `normalization`; default false.
    #[serde(default)]
    pub qk_layernorm: bool,
    /// Llama-4 style weightless L2 norm of queries and keys; default false.
    #[serde(default)]
    pub qk_l2_norm: bool,
    /// `LayerNorm` or `RMSNorm`; default `LayerNorm`.
    #[serde(default = "default_normalization")]
    pub normalization: Normalization,
    /// Epsilon of every norm; default 1e-5.
    #[serde(default = "default_layernorm_epsilon")]
    pub layernorm_epsilon: f64,
    /// Biases in all linear layers; default true.
    #[serde(default = "default_true")]
    pub add_bias_linear: bool,
    /// Bias in the QKV projection only; default false.
    #[serde(default)]
    pub add_qkv_bias: bool,
    /// RoFormer-style interleaved rotary pairs instead of rotate-half; default false.
    #[serde(default)]
    pub rotary_interleaved: bool,
    /// Rotary base period; default 10000.
    #[serde(default = "default_rotary_base")]
    pub rotary_base: f64,
    /// Fraction of each head's channels that are rotated; default 1.0.
    #[serde(default = "default_one")]
    pub rotary_percent: f64,
    /// Positions are divided by this factor (linear RoPE interpolation); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len_interpolation_factor: Option<f64>,
    /// `learned_absolute` (default, as `GPTModel`), `rope` or `none`.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: PositionEmbeddingType,
    /// Parameter dtype; default `float32`.
    #[serde(default = "default_params_dtype")]
    pub params_dtype: ParamsDtype,
    /// Inputs are fp16 (enables the fp32 softmax upcast); default false.
    #[serde(default)]
    pub fp16: bool,
    /// Inputs are bf16 (enables the fp32 softmax upcast); default false.
    #[serde(default)]
    pub bf16: bool,
    /// Std of the normal weight init; default 0.02.
    #[serde(default = "default_init_method_std")]
    pub init_method_std: f64,
    /// Track max attention logits and allow `clip_qk`; default false.
    #[serde(default)]
    pub qk_clip: bool,
    /// QK-Clip threshold τ; default 100.
    #[serde(default = "default_qk_clip_threshold")]
    pub qk_clip_threshold: f64,
    /// QK-Clip balance α; default 0.5.
    #[serde(default = "default_qk_clip_alpha")]
    pub qk_clip_alpha: f64,
    /// Track max attention logits for logging only; default false.
    #[serde(default)]
    pub log_max_attention_logit: bool,
    /// `full` or `selective`; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_granularity: Option<RecomputeGranularity>,
    /// Modules recomputed under selective recompute; default `["core_attn"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_modules: Option<Vec<String>>,
    /// Compute weight gradients later, in `backward_dw`; default false.
    #[serde(default)]
    pub delay_wgrad_compute: bool,
    /// Run the realtime consistency checks in every forward; default false.
    #[serde(default)]
    pub test_mode: bool,
    /// Tensor-parallel size; default 1.
    #[serde(default = "default_one_i64")]
    pub tensor_model_parallel_size: i64,
    /// Sequence parallelism (needs tensor parallelism); default false.
    #[serde(default)]
    pub sequence_parallel: bool,
    /// Context-parallel size; default 1.
    #[serde(default = "default_one_i64")]
    pub context_parallel_size: i64,
}

/// A validated `TransformerConfig` with Megatron's derived fields filled in. Field names are
/// Megatron's; sizes are `i64`, the type libtorch shapes use.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// Number of transformer layers.
    pub num_layers: i64,
    /// Hidden size `h`.
    pub hidden_size: i64,
    /// Query heads `nh`.
    pub num_attention_heads: i64,
    /// Key/value heads `ng`.
    pub num_query_groups: i64,
    /// Head dimension `hn`.
    pub kv_channels: i64,
    /// Attention-probability dropout.
    pub attention_dropout: f64,
    /// Explicit softmax scale, if any.
    pub softmax_scale: Option<f64>,
    /// Layer-number scaling of the scores.
    pub apply_query_key_layer_scaling: bool,
    /// Softmax in fp32 for half inputs (forced by layer scaling).
    pub attention_softmax_in_fp32: bool,
    /// Q/K layernorm.
    pub qk_layernorm: bool,
    /// Q/K L2 norm.
    pub qk_l2_norm: bool,
    /// Norm type.
    pub normalization: Normalization,
    /// Norm epsilon.
    pub layernorm_epsilon: f64,
    /// Linear biases.
    pub add_bias_linear: bool,
    /// QKV bias.
    pub add_qkv_bias: bool,
    /// Interleaved rotary.
    pub rotary_interleaved: bool,
    /// Rotary base.
    pub rotary_base: f64,
    /// Rotary fraction.
    pub rotary_percent: f64,
    /// Rotary position interpolation factor.
    pub seq_len_interpolation_factor: Option<f64>,
    /// Position embedding type.
    pub position_embedding_type: PositionEmbeddingType,
    /// Parameter dtype.
    pub params_dtype: ParamsDtype,
    /// fp16 inputs.
    pub fp16: bool,
    /// bf16 inputs.
    pub bf16: bool,
    /// Weight init std.
    pub init_method_std: f64,
    /// QK-Clip.
    pub qk_clip: bool,
    /// QK-Clip τ.
    pub qk_clip_threshold: f64,
    /// QK-Clip α.
    pub qk_clip_alpha: f64,
    /// Log max logits.
    pub log_max_attention_logit: bool,
    /// Recompute granularity.
    pub recompute_granularity: Option<RecomputeGranularity>,
    /// Recompute modules (default `["core_attn"]`).
    pub recompute_modules: Vec<String>,
    /// Delayed weight gradients.
    pub delay_wgrad_compute: bool,
    /// Realtime tests.
    pub test_mode: bool,
    /// TP size.
    pub tensor_model_parallel_size: i64,
    /// Sequence parallel.
    pub sequence_parallel: bool,
    /// CP size.
    pub context_parallel_size: i64,
}

impl TransformerConfig {
    /// `kv_channels * num_attention_heads` (global, as Megatron's `query_projection_size`).
    pub fn query_projection_size(&self) -> i64 {
        self.kv_channels * self.num_attention_heads
    }

    /// `kv_channels * num_query_groups` (global).
    pub fn kv_projection_size(&self) -> i64 {
        self.kv_channels * self.num_query_groups
    }

    /// Query heads per KV group, `nh / ng`.
    pub fn heads_per_group(&self) -> i64 {
        self.num_attention_heads / self.num_query_groups
    }

    /// Megatron's `num_attention_heads_per_partition`: `nh / tp`, or `nh / ng` when `ng < tp`.
    pub fn num_attention_heads_per_partition(&self) -> i64 {
        if self.num_query_groups < self.tensor_model_parallel_size {
            self.num_attention_heads / self.num_query_groups
        } else {
            self.num_attention_heads / self.tensor_model_parallel_size
        }
    }

    /// Megatron's `num_query_groups_per_partition`: `ng / tp`, or 1 when `ng < tp`.
    pub fn num_query_groups_per_partition(&self) -> i64 {
        if self.num_query_groups < self.tensor_model_parallel_size {
            1
        } else {
            self.num_query_groups / self.tensor_model_parallel_size
        }
    }

    /// Whether the core attention is recomputed in backward (selective recompute of
    /// `core_attn`), as Megatron's `checkpoint_core_attention`.
    pub fn checkpoint_core_attention(&self) -> bool {
        self.recompute_granularity == Some(RecomputeGranularity::Selective)
            && self.recompute_modules.iter().any(|m| m == "core_attn")
    }

    /// The number of channels the rotary embedding rotates: `int(kv_channels * rotary_percent)`
    /// when `rotary_percent < 1`, else `kv_channels`.
    pub fn rotary_dim(&self) -> i64 {
        if self.rotary_percent < 1.0 {
            (self.kv_channels as f64 * self.rotary_percent) as i64
        } else {
            self.kv_channels
        }
    }

    /// Std of `linear_proj`'s init: `init_method_std / sqrt(2 * num_layers)` (Megatron's
    /// `scaled_init_method_normal`).
    pub fn output_layer_init_std(&self) -> f64 {
        self.init_method_std / (2.0 * self.num_layers as f64).sqrt()
    }
}

fn positive(place: &Place, field: &'static str, value: i64) -> Result<i64> {
    if value > 0 {
        Ok(value)
    } else {
        Err(SpecError::InvalidValue {
            place: place.key(field),
            field,
            value: value.to_string(),
            reason: "must be a positive integer".into(),
        })
    }
}

fn check_f64(
    place: &Place,
    field: &'static str,
    value: f64,
    ok: impl Fn(f64) -> bool,
    reason: &str,
) -> Result<f64> {
    if value.is_finite() && ok(value) {
        Ok(value)
    } else {
        Err(SpecError::InvalidValue {
            place: place.key(field),
            field,
            value: value.to_string(),
            reason: reason.into(),
        })
    }
}

impl TransformerConfigSpec {
    /// A spec with the two required sizes and every other field at Megatron's default.
    pub fn new(hidden_size: i64, num_attention_heads: i64) -> Self {
        // Decoding an almost empty table applies exactly the serde defaults above.
        let mut spec: Self = toml::from_str("").unwrap_or_else(|_| unreachable!());
        spec.hidden_size = Some(hidden_size);
        spec.num_attention_heads = Some(num_attention_heads);
        spec
    }

    /// Validates and derives, as `TransformerConfig.__post_init__` does. `place` is where the
    /// table sits in its file (`transformer`); `declared_layers` is the number of `[[layers]]`.
    pub fn resolve(&self, place: &Place, declared_layers: usize) -> Result<TransformerConfig> {
        let hidden_size = positive(
            place,
            "hidden_size",
            self.hidden_size
                .ok_or(SpecError::MissingField { place: place.clone(), field: "hidden_size" })?,
        )?;
        let num_attention_heads = positive(
            place,
            "num_attention_heads",
            self.num_attention_heads.ok_or(SpecError::MissingField {
                place: place.clone(),
                field: "num_attention_heads",
            })?,
        )?;
        let num_layers = match self.num_layers {
            Some(n) => positive(place, "num_layers", n)?,
            None => declared_layers.max(1) as i64,
        };
        let tp = positive(place, "tensor_model_parallel_size", self.tensor_model_parallel_size)?;
        let cp = positive(place, "context_parallel_size", self.context_parallel_size)?;
        let num_query_groups = match self.num_query_groups {
            Some(g) => positive(place, "num_query_groups", g)?,
            None => num_attention_heads,
        };
        let kv_channels = match self.kv_channels {
            Some(k) => positive(place, "kv_channels", k)?,
            None => {
                let k = hidden_size / num_attention_heads;
                if k == 0 {
                    return Err(SpecError::Incompatible {
                        place: place.key("num_attention_heads"),
                        reason: format!(
                            "kv_channels defaults to hidden_size // num_attention_heads = \
                             {hidden_size} // {num_attention_heads} = 0; set kv_channels or use \
                             fewer heads"
                        ),
                    });
                }
                k
            }
        };
        // The relational checks run in Megatron's order (`ModelParallelConfig.__post_init__`,
        // then `TransformerConfig.__post_init__`, then the attention's `divide`), so that a
        // config with several problems reports the one Megatron would.
        if self.sequence_parallel && tp <= 1 {
            return Err(SpecError::Incompatible {
                place: place.key("sequence_parallel"),
                reason: "cannot use sequence parallelism without tensor parallelism \
                         (tensor_model_parallel_size = 1)"
                    .into(),
            });
        }
        if self.fp16 && self.bf16 {
            return Err(SpecError::Incompatible {
                place: place.key("bf16"),
                reason: "only one of fp16 and bf16 may be true".into(),
            });
        }
        if num_attention_heads % tp != 0 {
            return Err(SpecError::Incompatible {
                place: place.key("tensor_model_parallel_size"),
                reason: format!(
                    "num_attention_heads ({num_attention_heads}) must be a multiple of \
                     tensor_model_parallel_size ({tp})"
                ),
            });
        }
        if num_query_groups % tp != 0 && tp % num_query_groups != 0 {
            return Err(SpecError::Incompatible {
                place: place.key("num_query_groups"),
                reason: format!(
                    "num_query_groups ({num_query_groups}) must be a multiple or divisor of \
                     tensor_model_parallel_size ({tp})"
                ),
            });
        }
        if num_attention_heads % num_query_groups != 0 {
            return Err(SpecError::Incompatible {
                place: place.key("num_query_groups"),
                reason: format!(
                    "num_attention_heads ({num_attention_heads}) must be a multiple of \
                     num_query_groups ({num_query_groups})"
                ),
            });
        }
        // The fused QKV projection's output size (Megatron's `query_projection_size + 2 *
        // kv_projection_size`) and every size below it must fit the i64 shapes use.
        let qkv_size = num_query_groups
            .checked_mul(2)
            .and_then(|g| g.checked_add(num_attention_heads))
            .and_then(|n| n.checked_mul(kv_channels));
        if qkv_size.is_none() {
            return Err(SpecError::Incompatible {
                place: place.key("kv_channels"),
                reason: format!(
                    "the qkv projection size kv_channels * (num_attention_heads + 2 * \
                     num_query_groups) = {kv_channels} * ({num_attention_heads} + 2 * \
                     {num_query_groups}) does not fit in a 64-bit integer"
                ),
            });
        }
        let attention_dropout = check_f64(
            place,
            "attention_dropout",
            self.attention_dropout,
            |p| (0.0..1.0).contains(&p),
            "must be in [0, 1)",
        )?;
        let softmax_scale = match self.softmax_scale {
            Some(s) => Some(check_f64(place, "softmax_scale", s, |s| s > 0.0, "must be > 0")?),
            None => None,
        };
        let layernorm_epsilon = check_f64(
            place,
            "layernorm_epsilon",
            self.layernorm_epsilon,
            |e| e >= 0.0,
            "must be >= 0",
        )?;
        let rotary_base =
            check_f64(place, "rotary_base", self.rotary_base, |b| b > 0.0, "must be > 0")?;
        let rotary_percent = check_f64(
            place,
            "rotary_percent",
            self.rotary_percent,
            |p| p > 0.0 && p <= 1.0,
            "must be in (0, 1]",
        )?;
        let seq_len_interpolation_factor = match self.seq_len_interpolation_factor {
            Some(f) => Some(check_f64(
                place,
                "seq_len_interpolation_factor",
                f,
                |f| f > 0.0,
                "must be > 0",
            )?),
            None => None,
        };
        let init_method_std = check_f64(
            place,
            "init_method_std",
            self.init_method_std,
            |s| s >= 0.0,
            "must be >= 0",
        )?;
        let qk_clip_threshold = check_f64(
            place,
            "qk_clip_threshold",
            self.qk_clip_threshold,
            |t| t > 0.0,
            "must be > 0",
        )?;
        let qk_clip_alpha = check_f64(
            place,
            "qk_clip_alpha",
            self.qk_clip_alpha,
            |a| (0.0..=1.0).contains(&a),
            "must be in [0, 1]",
        )?;
        if self.position_embedding_type == PositionEmbeddingType::Rope {
            let dim = if rotary_percent < 1.0 {
                (kv_channels as f64 * rotary_percent) as i64
            } else {
                kv_channels
            };
            if dim < 2 || dim % 2 != 0 {
                return Err(SpecError::Incompatible {
                    place: place.key("rotary_percent"),
                    reason: format!(
                        "the rotary dimension int(kv_channels * rotary_percent) = \
                         int({kv_channels} * {rotary_percent}) = {dim} must be even and at \
                         least 2"
                    ),
                });
            }
        }
        let recompute_modules =
            self.recompute_modules.clone().unwrap_or_else(|| vec!["core_attn".to_string()]);
        let selective = self.recompute_granularity == Some(RecomputeGranularity::Selective);
        if let Some(bad) =
            recompute_modules.iter().find(|m| selective && !RECOMPUTE_MODULES.contains(&m.as_str()))
        {
            return Err(SpecError::InvalidValue {
                place: place.key("recompute_modules"),
                field: "recompute_modules",
                value: format!("\"{bad}\""),
                reason: format!("allowed modules are {}", RECOMPUTE_MODULES.join(", ")),
            });
        }
        Ok(TransformerConfig {
            num_layers,
            hidden_size,
            num_attention_heads,
            num_query_groups,
            kv_channels,
            attention_dropout,
            softmax_scale,
            apply_query_key_layer_scaling: self.apply_query_key_layer_scaling,
            attention_softmax_in_fp32: self.attention_softmax_in_fp32
                || self.apply_query_key_layer_scaling,
            qk_layernorm: self.qk_layernorm,
            qk_l2_norm: self.qk_l2_norm,
            normalization: self.normalization,
            layernorm_epsilon,
            add_bias_linear: self.add_bias_linear,
            add_qkv_bias: self.add_qkv_bias,
            rotary_interleaved: self.rotary_interleaved,
            rotary_base,
            rotary_percent,
            seq_len_interpolation_factor,
            position_embedding_type: self.position_embedding_type,
            params_dtype: self.params_dtype,
            fp16: self.fp16,
            bf16: self.bf16,
            init_method_std,
            qk_clip: self.qk_clip,
            qk_clip_threshold,
            qk_clip_alpha,
            log_max_attention_logit: self.log_max_attention_logit,
            recompute_granularity: self.recompute_granularity,
            recompute_modules,
            delay_wgrad_compute: self.delay_wgrad_compute,
            test_mode: self.test_mode,
            tensor_model_parallel_size: tp,
            sequence_parallel: self.sequence_parallel,
            context_parallel_size: cp,
        })
    }
}
