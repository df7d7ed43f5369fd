//! `sdpa`: a core attention backed by libtorch's `scaled_dot_product_attention` (flash, cuDNN
//! or memory-efficient kernels on CUDA, a fused CPU kernel or the math path on CPU), with the
//! same semantics as `dot-product-attention`:
//!
//! * scale `softmax_scale` or `1/sqrt(kv_channels)` (layer scaling cancels out, as it does in
//!   Megatron up to rounding);
//! * GQA through `enable_gqa`, without repeating keys and values;
//! * `causal` with no mask builds no mask tensor: `is_causal` when `sq > 1` (needs `sq == sk`),
//!   nothing for a single query token;
//! * a boolean mask (true = masked) becomes SDPA's keep-mask; a row whose keys are all masked
//!   gets what Megatron's `-10000` fill gives it, the uniform average of every value, instead of
//!   SDPA's NaN;
//! * `attention_bias` becomes SDPA's additive float mask (masked positions set to -inf);
//! * packed THD sequences through the block-diagonal mask.
//!
//! Softmax precision is the kernel's own (fp32 accumulation on every backend), so for fp16/bf16
//! inputs it matches `attention_softmax_in_fp32 = true`.

use attention_spec::module::{CoreAttention, CoreAttentionInput};
use attention_spec::registry::{Builder, CoreAttentionArgs, ModuleFactory, NoParams};
use attention_spec::{AttnMaskType, ForwardError, SpecError};
use tch::{Kind, Tensor};

use crate::check::check_core_input;
use crate::mask::{CausalMaskCache, check_causal_square, effective_mask};
use crate::training::MaxLogitTracker;

/// Query rows per chunk when recomputing logit maxima (bounds the extra memory to
/// `b * np * CHUNK * sk` scores).
const LOGIT_CHUNK: i64 = 256;

/// The SDPA-backed core attention.
#[derive(Debug)]
pub struct SdpaAttention {
    attn_mask_type: AttnMaskType,
    scale: f64,
    dropout: f64,
    causal_masks: CausalMaskCache,
    /// Per-head max logits of training forwards (`qk_clip` / `log_max_attention_logit`).
    max_logits: Option<MaxLogitTracker>,
}

impl SdpaAttention {
    /// Builds the module from its slot arguments.
    pub fn new(args: &CoreAttentionArgs<'_>) -> Result<Self, SpecError> {
        let _: NoParams = args.params.decode("sdpa")?;
        if args.config.context_parallel_size != 1 {
            return Err(SpecError::Unsupported {
                place: args.params.place.clone(),
                what: format!(
                    "context parallelism (context_parallel_size = {}) in sdpa",
                    args.config.context_parallel_size
                ),
            });
        }
        let scale =
            args.config.softmax_scale.unwrap_or(1.0 / (args.config.kv_channels as f64).sqrt());
        Ok(Self {
            attn_mask_type: args.attn_mask_type,
            scale,
            dropout: args.config.attention_dropout,
            causal_masks: CausalMaskCache::default(),
            max_logits: (args.config.qk_clip || args.config.log_max_attention_logit)
                .then(MaxLogitTracker::default),
        })
    }
}

/// One `scaled_dot_product_attention` call on the `[b, heads, s, hn]` views of the inputs, with
/// no mask tensor: what [`SdpaAttention`]'s forward runs for a call without a mask, bias, packed
/// sequences or max-logit tracking ([`SdpaAttention::plain_call`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlainSdpa {
    /// `is_causal` (a causal mask type and more than one query token).
    pub causal: bool,
    /// The softmax scale.
    pub scale: f64,
    /// The dropout probability (0 outside training).
    pub dropout: f64,
    /// Fewer key/value heads than query heads (`enable_gqa`).
    pub gqa: bool,
}

impl SdpaAttention {
    /// The SDPA call the forward makes for `input` when it is a single one without a mask
    /// tensor, after the forward's checks of the input (their errors are returned); `None` when
    /// the forward needs more (a mask, a bias, packed sequences, training with max-logit
    /// tracking). A backend may run the call its own way; the result must be the forward's:
    /// the output is `[sq, b, np * hn]`.
    pub fn plain_call(
        &self,
        input: &CoreAttentionInput<'_>,
    ) -> Result<Option<PlainSdpa>, ForwardError> {
        if input.attention_mask.is_some()
            || input.attention_bias.is_some()
            || input.packed_seq_params.is_some()
            || (input.training && self.max_logits.is_some())
        {
            return Ok(None);
        }
        let d = check_core_input(input)?;
        let causal = self.attn_mask_type == AttnMaskType::Causal && d.sq > 1;
        if causal {
            check_causal_square(&d)?;
        }
        Ok(Some(PlainSdpa {
            causal,
            scale: self.scale,
            dropout: if input.training { self.dropout } else { 0.0 },
            gqa: d.np != d.ngp,
        }))
    }

    /// SDPA keeps no scores, so QK-Clip's per-head maxima of `mask(q·kᵀ·scale + bias)` are
    /// computed here, without gradients, `LOGIT_CHUNK` query rows at a time.
    fn record_max_logits(
        &self,
        q: &Tensor,
        k: &Tensor,
        mask: Option<&Tensor>,
        bias: Option<&Tensor>,
        group: i64,
    ) -> Result<(), ForwardError> {
        let Some(tracker) = &self.max_logits else { return Ok(()) };
        tch::no_grad(|| -> Result<(), ForwardError> {
            let sq = q.size()[2];
            let k = if group > 1 {
                k.f_repeat_interleave_self_int(group, 1, None)?
            } else {
                k.shallow_clone()
            };
            let kt = k.f_to_kind(Kind::Float)?.f_transpose(-2, -1)?;
            // Rows of a mask/bias that are not broadcast along sq.
            let rows = |t: &Tensor, start: i64, len: i64| -> Result<Tensor, ForwardError> {
                let t = if t.dim() == 2 { t.f_view([1, 1, sq, -1])? } else { t.shallow_clone() };
                Ok(if t.size()[2] == 1 { t } else { t.f_narrow(2, start, len)? })
            };
            let mut best: Option<Tensor> = None;
            let mut start = 0;
            while start < sq {
                let len = LOGIT_CHUNK.min(sq - start);
                let qc = q.f_narrow(2, start, len)?.f_to_kind(Kind::Float)?;
                let mut s = qc.f_matmul(&kt)?.f_mul_scalar(self.scale)?;
                if let Some(b) = bias {
                    s = s.f_add(&rows(b, start, len)?.f_to_kind(Kind::Float)?)?;
                }
                if let Some(m) = mask {
                    s = s.f_masked_fill(&rows(m, start, len)?, f64::NEG_INFINITY)?;
                }
                let chunk_max = s.f_amax([0, 2, 3], false)?;
                best = Some(match best {
                    Some(prev) => prev.f_maximum(&chunk_max)?,
                    None => chunk_max,
                });
                start += len;
            }
            match best {
                Some(b) => tracker.record(&b),
                None => Ok(()),
            }
        })
    }
}

impl CoreAttention for SdpaAttention {
    fn kind(&self) -> &'static str {
        "sdpa"
    }

    fn forward(&self, input: &CoreAttentionInput<'_>) -> Result<Tensor, ForwardError> {
        let d = check_core_input(input)?;
        let (sq, b, np, hn) = (d.sq, d.b, d.np, d.hn);
        // 1. [s, b, heads, hn] -> [b, heads, s, hn] views (no copies).
        let q = input.query.f_permute([1, 2, 0, 3])?;
        let k = input.key.f_permute([1, 2, 0, 3])?;
        let v = input.value.f_permute([1, 2, 0, 3])?;
        let dropout = if input.training { self.dropout } else { 0.0 };
        let gqa = np != d.ngp;

        // 2. Causal without a mask tensor: let the kernel do it.
        let plain_causal = self.attn_mask_type == AttnMaskType::Causal
            && input.attention_mask.is_none()
            && input.packed_seq_params.is_none();
        if plain_causal && input.attention_bias.is_none() {
            if sq > 1 {
                check_causal_square(&d)?;
            }
            if input.training && self.max_logits.is_some() {
                let causal = (sq > 1).then(|| self.causal_masks.get(sq, q.device()));
                self.record_max_logits(&q, &k, causal.as_ref(), None, np / d.ngp)?;
            }
            let out = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                dropout,
                sq > 1,
                self.scale,
                gqa,
            )?;
            return to_sbh(&out, sq, b, np, hn);
        }

        // 3. General case: an explicit boolean mask and/or a bias.
        let mask = effective_mask(input, self.attn_mask_type, &d, &self.causal_masks)?;
        if input.training && self.max_logits.is_some() {
            self.record_max_logits(&q, &k, mask.as_ref(), input.attention_bias, np / d.ngp)?;
        }
        // Rows whose keys are all masked: Megatron's -10000 fill makes them uniform.
        let full_rows = match &mask {
            Some(m) => Some(m.f_all_dim(-1, true)?),
            None => None,
        };
        let attn_mask = match (&mask, input.attention_bias) {
            (None, None) => None,
            (Some(m), None) => {
                let keep = m.f_logical_not()?;
                Some(match &full_rows {
                    Some(f) => keep.f_logical_or(f)?,
                    None => keep,
                })
            }
            (m, Some(bias)) => {
                let bias = bias.f_to_kind(q.kind())?;
                Some(match (m, &full_rows) {
                    (Some(m), Some(f)) => {
                        let hidden = m.f_logical_and(&f.f_logical_not()?)?;
                        Tensor::f_where_scalarself(&hidden, f64::NEG_INFINITY, &bias)?
                    }
                    _ => bias,
                })
            }
        };
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            attn_mask.as_ref(),
            dropout,
            false,
            self.scale,
            gqa,
        )?;
        let out = match &full_rows {
            Some(full) => {
                // Uniform attention over all sk keys, per query head.
                let mean = v.f_mean_dim(-2, true, None::<Kind>)?;
                let mean = if gqa {
                    mean.f_repeat_interleave_self_int(np / d.ngp, 1, None)?
                } else {
                    mean
                };
                mean.f_expand_as(&out)?.f_where_self(full, &out)?
            }
            None => out,
        };
        to_sbh(&out, sq, b, np, hn)
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

/// `[b, np, sq, hn]` -> `[sq, b, np * hn]`.
fn to_sbh(out: &Tensor, sq: i64, b: i64, np: i64, hn: i64) -> Result<Tensor, ForwardError> {
    Ok(out.f_permute([2, 0, 1, 3])?.f_contiguous()?.f_view([sq, b, np * hn])?)
}

fn build(args: &CoreAttentionArgs<'_>) -> Result<Box<dyn CoreAttention>, SpecError> {
    Ok(Box::new(SdpaAttention::new(args)?))
}

inventory::submit! {
    ModuleFactory {
        kind: "sdpa",
        aliases: &["ScaledDotProductAttention"],
        summary: "libtorch scaled_dot_product_attention (flash / cuDNN / CPU fused), GQA native",
        registered_in: module_path!(),
        builder: Builder::CoreAttention(build),
    }
}
