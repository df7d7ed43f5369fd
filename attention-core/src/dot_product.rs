//! `DotProductAttention`, Megatron's local (pure PyTorch) core attention, op for op:
//! `repeat_interleave` of key/value heads for GQA, scores by `baddbmm(beta = 0,
//! alpha = softmax_scale)`, the unfused `FusedScaleMaskSoftmax` path (fp32 upcast for fp16/bf16
//! inputs when `attention_softmax_in_fp32`, `× layer_number` under
//! `apply_query_key_layer_scaling`, masked logits *replaced* by -10000), dropout, then
//! `bmm` with the values.
//!
//! Beyond Megatron's local module (which asserts both are absent) it takes an
//! `attention_bias`, added to the fully scaled scores before masking (TransformerEngine's
//! `post_scale_bias`), and packed THD sequences, through a block-diagonal mask.

use attention_spec::module::{CoreAttention, CoreAttentionInput};
use attention_spec::registry::{Builder, CoreAttentionArgs, ModuleFactory, NoParams};
use attention_spec::{AttnMaskType, ForwardError, SpecError};
use tch::{Kind, Tensor};

use crate::check::check_core_input;
use crate::mask::{CausalMaskCache, effective_mask};
use crate::training::MaxLogitTracker;

/// Megatron's masked-logit fill value.
pub const MASK_FILL: f64 = -10000.0;

/// The local core attention.
#[derive(Debug)]
pub struct DotProductAttention {
    attn_mask_type: AttnMaskType,
    /// `alpha` of the score GEMM: the softmax scale divided by the layer-scaling coefficient.
    alpha: f64,
    /// `layer_number` when `apply_query_key_layer_scaling`.
    coeff: Option<f64>,
    input_in_fp16: bool,
    input_in_bf16: bool,
    softmax_in_fp32: bool,
    dropout: f64,
    causal_masks: CausalMaskCache,
    /// Per-head max logits of training forwards (`qk_clip` / `log_max_attention_logit`).
    max_logits: Option<MaxLogitTracker>,
}

/// `softmax_scale` (or `1/sqrt(kv_channels)`) divided by `layer_number` under layer scaling,
/// and the coefficient itself, exactly as `DotProductAttention.__init__` computes them.
pub fn softmax_scale_and_coeff(args: &CoreAttentionArgs<'_>) -> (f64, Option<f64>) {
    let config = args.config;
    let layer_number = args.layer_number.max(1);
    let mut scale = config.softmax_scale.unwrap_or(1.0 / (config.kv_channels as f64).sqrt());
    let mut coeff = None;
    if config.apply_query_key_layer_scaling {
        coeff = Some(layer_number as f64);
        scale /= layer_number as f64;
    }
    (scale, coeff)
}

impl DotProductAttention {
    /// Builds the module from its slot arguments.
    pub fn new(args: &CoreAttentionArgs<'_>) -> Result<Self, SpecError> {
        let _: NoParams = args.params.decode("dot-product-attention")?;
        if args.config.context_parallel_size != 1 {
            return Err(SpecError::Unsupported {
                place: args.params.place.clone(),
                what: format!(
                    "context parallelism (context_parallel_size = {}) in dot-product-attention, \
                     as in Megatron's local DotProductAttention",
                    args.config.context_parallel_size
                ),
            });
        }
        let (alpha, coeff) = softmax_scale_and_coeff(args);
        Ok(Self {
            attn_mask_type: args.attn_mask_type,
            alpha,
            coeff,
            input_in_fp16: args.config.fp16,
            input_in_bf16: args.config.bf16,
            softmax_in_fp32: args.config.attention_softmax_in_fp32,
            dropout: args.config.attention_dropout,
            causal_masks: CausalMaskCache::default(),
            max_logits: (args.config.qk_clip || args.config.log_max_attention_logit)
                .then(MaxLogitTracker::default),
        })
    }

    /// `FusedScaleMaskSoftmax.forward_torch_softmax`, plus the post-scale bias; with `track`,
    /// records the per-head maxima of the masked logits for QK-Clip.
    fn softmax(
        &self,
        scores: &Tensor,
        mask: Option<&Tensor>,
        bias: Option<&Tensor>,
        track: bool,
    ) -> Result<Tensor, ForwardError> {
        let in_float16 = self.input_in_fp16 || self.input_in_bf16;
        let mut x = if in_float16 && self.softmax_in_fp32 {
            scores.f_to_kind(Kind::Float)?
        } else {
            scores.shallow_clone()
        };
        if let Some(c) = self.coeff {
            x = x.f_mul_scalar(c)?;
        }
        if let Some(bias) = bias {
            x = x.f_add(&bias.f_to_kind(x.kind())?)?;
        }
        if let (true, Some(tracker)) = (track, &self.max_logits) {
            tch::no_grad(|| -> Result<(), ForwardError> {
                let masked = match mask {
                    Some(m) => x.f_masked_fill(m, f64::NEG_INFINITY)?,
                    None => x.shallow_clone(),
                };
                tracker.record(&masked.f_amax([0, 2, 3], false)?)
            })?;
        }
        if let Some(mask) = mask {
            x = x.f_masked_fill(mask, MASK_FILL)?;
        }
        let probs = x.f_softmax(-1, None::<Kind>)?;
        if in_float16 && self.softmax_in_fp32 {
            let kind = if self.input_in_fp16 { Kind::Half } else { Kind::BFloat16 };
            return Ok(probs.f_to_kind(kind)?);
        }
        Ok(probs)
    }
}

impl CoreAttention for DotProductAttention {
    fn kind(&self) -> &'static str {
        "dot-product-attention"
    }

    fn forward(&self, input: &CoreAttentionInput<'_>) -> Result<Tensor, ForwardError> {
        let d = check_core_input(input)?;
        let mask = effective_mask(input, self.attn_mask_type, &d, &self.causal_masks)?;
        let (sq, b, np, sk, hn) = (d.sq, d.b, d.np, d.sk, d.hn);
        // 1. GQA: key/value head g serves query heads g*P .. (g+1)*P.
        let (key, value) = if np / d.ngp > 1 {
            let p = np / d.ngp;
            (
                input.key.f_repeat_interleave_self_int(p, 2, None)?,
                input.value.f_repeat_interleave_self_int(p, 2, None)?,
            )
        } else {
            (input.key.shallow_clone(), input.value.shallow_clone())
        };
        // 2. Scores [b*np, sq, sk] = alpha * q·kᵀ, the GEMM epilogue doing the scaling.
        let q = input.query.f_reshape([sq, b * np, hn])?.f_transpose(0, 1)?;
        let k = key.f_reshape([sk, b * np, hn])?.f_transpose(0, 1)?.f_transpose(1, 2)?;
        let buffer = Tensor::f_empty([b * np, sq, sk], (q.kind(), q.device()))?;
        let scores = buffer.f_baddbmm(&q, &k, 0.0, self.alpha)?.f_view([b, np, sq, sk])?;
        // 3. Scale / mask / softmax, dropout.
        let probs = self.softmax(&scores, mask.as_ref(), input.attention_bias, input.training)?;
        let probs = if input.training && self.dropout > 0.0 {
            probs.f_dropout(self.dropout, true)?
        } else {
            probs
        };
        // 4. Context [b*np, sq, hn] -> [sq, b, np*hn].
        let v = value.f_reshape([sk, b * np, hn])?.f_transpose(0, 1)?;
        let ctx = probs.f_view([b * np, sq, sk])?.f_bmm(&v)?;
        Ok(ctx.f_view([b, np, sq, hn])?.f_permute([2, 0, 1, 3])?.f_contiguous()?.f_view([
            sq,
            b,
            np * hn,
        ])?)
    }

    fn max_attention_logits(&self) -> Option<Tensor> {
        self.max_logits.as_ref().and_then(MaxLogitTracker::get)
    }

    fn reset_max_attention_logits(&self) {
        if let Some(t) = &self.max_logits {
            t.reset();
        }
    }
}

fn build(args: &CoreAttentionArgs<'_>) -> Result<Box<dyn CoreAttention>, SpecError> {
    Ok(Box::new(DotProductAttention::new(args)?))
}

inventory::submit! {
    ModuleFactory {
        kind: "dot-product-attention",
        aliases: &["DotProductAttention"],
        summary: "Megatron's local core attention (baddbmm, masked softmax, bmm)",
        registered_in: module_path!(),
        builder: Builder::CoreAttention(build),
    }
}
