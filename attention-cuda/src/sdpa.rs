//! `sdpa-cuda`: libtorch's fused attention on CUDA with the backend chosen in the spec and
//! reported, and packed THD sequences through libtorch's variable-length flash attention.
//!
//! ```toml
//! [attention.submodules]
//! core_attention = { module = "sdpa-cuda", params = { backend = "cudnn" } }
//! ```
//!
//! Backends: `auto` (libtorch's own order; on H100/H200 with cuDNN 9.19 that is cuDNN), `cudnn`,
//! `flash`, `efficient`, `math`. The choice is applied around each call (libtorch's switches are
//! process-wide, as PyTorch's `sdpa_kernel` context manager), and [`SdpaCuda::last_backend`] reports
//! what libtorch picked for the last call. Semantics are those of `attention-core`'s `sdpa`
//! kind. A call without a mask or bias is that kind's one SDPA call
//! ([`SdpaAttention::plain_call`]), made in C++ in one trip through the shim; when the inputs'
//! shapes, strides, dtypes, devices, alignment and gradient flags are the last call's and
//! libtorch chose cuDNN for them, it runs cuDNN's kernel directly, as SDPA itself would,
//! without checking, choosing or switching again (a model calls with the same shapes layer
//! after layer; on an H200, forwards of one 128- to 512-token sequence, whose host work is as
//! long as their kernel, ran 1.04-1.18x as fast as through the `sdpa` kind). Where autograd
//! records nothing (no gradients wanted), the shim views the inputs and output in SDPA's layout
//! through c10's `TensorImpl` rather than libtorch's dispatcher: those forwards then ran
//! x1.02 of SDPA default on its own layout (median of 12; x0.87 with dispatched views; same
//! H200 host). Where it does record them and libtorch runs cuDNN, the shim makes the call one
//! autograd node (a C++ autograd function over cuDNN's forward and backward, its views made
//! the same way), where permutes and views added five: host-bound forward+backward passes ran
//! x0.96-0.98 of SDPA default instead of x0.86 (medians of 12, two processes each). Packed
//! sequences in fp16/bf16 without a caller mask or bias run
//! `aten::_flash_attention_forward`/`_backward` on the packed layout (no `[t, t]` mask); other
//! packed calls use the block-diagonal mask of the `sdpa` kind.

#[cfg(feature = "cuda")]
use std::sync::Mutex;
#[cfg(feature = "cuda")]
use std::sync::atomic::{AtomicI64, Ordering};

use attention_core::sdpa::SdpaAttention;
use attention_spec::module::{CoreAttention, CoreAttentionInput};
use attention_spec::registry::{Builder, CoreAttentionArgs, ModuleFactory, Params};
use attention_spec::{ForwardError, SpecError};
use serde::Deserialize;
use tch::Tensor;

/// An SDPA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// libtorch's default order.
    #[default]
    Auto,
    /// cuDNN fused attention.
    Cudnn,
    /// FlashAttention-2 (vendored in libtorch).
    Flash,
    /// Memory-efficient attention (xformers' CUTLASS kernel).
    Efficient,
    /// The unfused math path.
    Math,
}

impl Backend {
    /// `[flash, mem_efficient, math, cudnn]` switches that select this backend.
    pub fn switches(self) -> [bool; 4] {
        match self {
            Self::Auto => [true, true, true, true],
            Self::Cudnn => [false, false, false, true],
            Self::Flash => [true, false, false, false],
            Self::Efficient => [false, true, false, false],
            Self::Math => [false, false, true, false],
        }
    }

    /// The name of `at::SDPBackend` value `code` (`_fused_sdp_choice`).
    pub fn name_of(code: i64) -> &'static str {
        match code {
            0 => "math",
            1 => "flash",
            2 => "efficient",
            3 => "cudnn",
            4 => "overrideable",
            _ => "none",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SdpaCudaParams {
    #[serde(default)]
    backend: Backend,
}

/// `_fused_sdp_choice`'s code for cuDNN attention.
#[cfg(feature = "cuda")]
const CUDNN: i64 = 3;

/// Serialises the process-wide backend switches.
#[cfg(feature = "cuda")]
static SWITCHES: Mutex<()> = Mutex::new(());

/// The `sdpa-cuda` core attention.
#[derive(Debug)]
pub struct SdpaCuda {
    inner: SdpaAttention,
    backend: Backend,
    #[cfg(feature = "cuda")]
    varlen: VarlenSettings,
    /// `_fused_sdp_choice` of the last call (-1: none yet, or the varlen path).
    #[cfg(feature = "cuda")]
    last: AtomicI64,
    /// The last call's `ChoiceKey`, libtorch's `_fused_sdp_choice` for it and, for a call
    /// without a mask, the SDPA call the inner kind makes: libtorch's backend selection and
    /// our input checks cost microseconds of host time per call, and a model calls with the
    /// same inputs' shapes over and over.
    #[cfg(feature = "cuda")]
    choice: Mutex<Option<Remembered>>,
}

/// What `_fused_sdp_choice` and the inner kind's checks depend on: the inputs' signature
/// (`shim::sdpa_signature`: shapes, strides, dtypes, devices, alignment, gradient flags, grad
/// mode, the deterministic flag), the training flag (dropout, max-logit tracking) and whether
/// the call has a mask, bias or packed sequences. The backend switches are the module's own.
#[cfg(feature = "cuda")]
#[derive(Debug, PartialEq)]
struct ChoiceKey {
    signature: [i64; crate::shim::SDPA_SIGNATURE],
    training: bool,
    masked: bool,
}

/// A remembered call: its key, libtorch's choice, and the inner kind's SDPA call for it (`None`
/// where the inner kind does more than one SDPA call without a mask).
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct Remembered {
    key: ChoiceKey,
    choice: i64,
    plain: Option<attention_core::sdpa::PlainSdpa>,
}

#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
struct VarlenSettings {
    scale: f64,
    dropout: f64,
    causal: bool,
}

impl SdpaCuda {
    /// Builds the kind; fails without the `cuda` feature.
    pub fn new(args: &CoreAttentionArgs<'_>) -> Result<Self, SpecError> {
        let params: SdpaCudaParams = args.params.decode("sdpa-cuda")?;
        if !cfg!(feature = "cuda") {
            return Err(SpecError::Unsupported {
                place: args.params.place.clone(),
                what: "sdpa-cuda needs attention-cuda built with the `cuda` feature".into(),
            });
        }
        let empty = Params { table: toml::Table::new(), place: args.params.place.clone() };
        let inner_args = CoreAttentionArgs {
            path: args.path,
            config: args.config,
            params: &empty,
            layer_number: args.layer_number,
            attn_mask_type: args.attn_mask_type,
            attention_type: args.attention_type,
        };
        Ok(Self {
            inner: SdpaAttention::new(&inner_args)?,
            backend: params.backend,
            #[cfg(feature = "cuda")]
            varlen: VarlenSettings {
                scale: args
                    .config
                    .softmax_scale
                    .unwrap_or(1.0 / (args.config.kv_channels as f64).sqrt()),
                dropout: args.config.attention_dropout,
                causal: matches!(
                    args.attn_mask_type,
                    attention_spec::AttnMaskType::Causal
                        | attention_spec::AttnMaskType::PaddingCausal
                ),
            },
            #[cfg(feature = "cuda")]
            last: AtomicI64::new(-1),
            #[cfg(feature = "cuda")]
            choice: Mutex::new(None),
        })
    }

    /// The configured backend.
    pub fn configured_backend(&self) -> Backend {
        self.backend
    }

    /// What libtorch picked for the last call (`"varlen-flash"` for packed sequences).
    pub fn last_backend(&self) -> Option<&'static str> {
        #[cfg(feature = "cuda")]
        {
            match self.last.load(Ordering::Relaxed) {
                -1 => None,
                -2 => Some("varlen-flash"),
                c => Some(Backend::name_of(c)),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    /// The remembered choice and SDPA call for `key`, if it is the last call's.
    #[cfg(feature = "cuda")]
    fn remembered(
        &self,
        key: &ChoiceKey,
    ) -> Option<(i64, Option<attention_core::sdpa::PlainSdpa>)> {
        let last = self.choice.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|r| r.key == *key).map(|r| (r.choice, r.plain))
    }

    /// What libtorch picks for this call's (permuted) inputs under the backend switches now
    /// set: `_fused_sdp_choice` with `plain`'s causal flag, scale and dropout (a masked call's
    /// choice is asked without its mask, and only reported), remembered for `key` (inputs
    /// without a signature have none: nothing is remembered).
    #[cfg(feature = "cuda")]
    fn choose(
        &self,
        key: Option<ChoiceKey>,
        input: &CoreAttentionInput<'_>,
        plain: Option<attention_core::sdpa::PlainSdpa>,
    ) -> i64 {
        // [s, b, heads, hn] -> [b, heads, s, hn], as the inner kind calls libtorch.
        let [q, k, v] = [input.query, input.key, input.value].map(|t| t.permute([1, 2, 0, 3]));
        let choice = Tensor::f_internal_fused_sdp_choice(
            &q,
            &k,
            &v,
            None::<Tensor>,
            plain.map_or(0.0, |c| c.dropout),
            plain.is_some_and(|c| c.causal),
            plain.map(|c| c.scale),
            q.size()[1] != k.size()[1],
        )
        .unwrap_or(-1);
        if let Some(key) = key {
            *self.choice.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Remembered { key, choice, plain });
        }
        choice
    }
}

#[cfg(feature = "cuda")]
mod varlen {
    //! Packed sequences through `aten::_flash_attention_forward`/`_backward`.
    use attention_core::autograd::{Function, apply};
    use attention_spec::ForwardError;
    use tch::Tensor;

    use super::VarlenSettings;
    use crate::shim::{flash_varlen_backward, flash_varlen_forward};

    pub(super) struct Varlen {
        pub(super) cu_q: Tensor,
        pub(super) cu_k: Tensor,
        pub(super) max_q: i64,
        pub(super) max_k: i64,
        pub(super) settings: VarlenSettings,
        pub(super) dropout: f64,
        pub(super) saved: Option<(Tensor, Tensor, Tensor, Tensor, [Tensor; 4])>,
    }

    impl Function for Varlen {
        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ForwardError> {
            let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
            let r = flash_varlen_forward(
                q,
                k,
                v,
                &self.cu_q,
                &self.cu_k,
                self.max_q,
                self.max_k,
                self.dropout,
                self.settings.causal,
                self.settings.scale,
            )?;
            let out = r[0].shallow_clone();
            self.saved = Some((q.detach(), k.detach(), v.detach(), out.detach(), r));
            Ok(vec![out])
        }

        fn backward(&mut self, grads: &[Tensor]) -> Result<Vec<Option<Tensor>>, ForwardError> {
            let (q, k, v, out, saved) = self.saved.as_ref().ok_or(ForwardError::Invalid {
                name: "varlen",
                reason: "backward before forward".into(),
            })?;
            let g = grads[0].f_contiguous()?;
            let [dq, dk, dv] = flash_varlen_backward(
                &g,
                (q, k, v),
                out,
                saved,
                &self.cu_q,
                &self.cu_k,
                self.max_q,
                self.max_k,
                self.dropout,
                self.settings.causal,
                self.settings.scale,
            )?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        }
    }

    /// `[t, 1, np, hn]` etc. → output `[t, 1, np * hn]`.
    pub(super) fn run(
        f: Varlen,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor, ForwardError> {
        let squeeze = |t: &Tensor| -> Result<Tensor, ForwardError> {
            Ok(t.f_squeeze_dim(1)?.f_contiguous()?)
        };
        let (qs, ks, vs) = (squeeze(q)?, squeeze(k)?, squeeze(v)?);
        let (t, np, hn) = (qs.size()[0], qs.size()[1], qs.size()[2]);
        let out = apply(Box::new(f), &[&qs, &ks, &vs], 1)?.remove(0);
        Ok(out.f_reshape([t, 1, np * hn])?)
    }
}

impl CoreAttention for SdpaCuda {
    fn kind(&self) -> &'static str {
        "sdpa-cuda"
    }

    fn forward(&self, input: &CoreAttentionInput<'_>) -> Result<Tensor, ForwardError> {
        #[cfg(feature = "cuda")]
        if let Some(packed) = input.packed_seq_params {
            let half = matches!(input.query.kind(), tch::Kind::Half | tch::Kind::BFloat16);
            if half
                && input.attention_mask.is_none()
                && input.attention_bias.is_none()
                && input.query.device().is_cuda()
            {
                attention_core::check::check_core_input(input)?;
                let f = varlen::Varlen {
                    cu_q: packed.cu_seqlens_q.f_to_kind(tch::Kind::Int)?,
                    cu_k: packed.cu_seqlens_kv.f_to_kind(tch::Kind::Int)?,
                    max_q: packed.max_seqlen_q,
                    max_k: packed.max_seqlen_kv,
                    settings: self.varlen,
                    dropout: if input.training { self.varlen.dropout } else { 0.0 },
                    saved: None,
                };
                self.last.store(-2, Ordering::Relaxed);
                return varlen::run(f, input.query, input.key, input.value);
            }
        }
        // libtorch's memory-efficient kernel has no GQA (`enable_gqa` makes it refuse the call),
        // so for that backend key/value heads are repeated up to the query heads first.
        let heads = |t: &Tensor| t.size().get(2).copied().unwrap_or(0);
        let (np, ng) = (heads(input.query), heads(input.key));
        let expanded = if self.backend == Backend::Efficient && np != ng && ng > 0 && np % ng == 0 {
            let repeat = |t: &Tensor| t.f_repeat_interleave_self_int(np / ng, 2, None);
            Some((repeat(input.key)?, repeat(input.value)?))
        } else {
            None
        };
        let input = match &expanded {
            Some((key, value)) => CoreAttentionInput { key, value, ..*input },
            None => *input,
        };
        #[cfg(feature = "cuda")]
        {
            let key =
                crate::shim::sdpa_signature(input.query, input.key, input.value).map(|signature| {
                    ChoiceKey {
                        signature,
                        training: input.training,
                        masked: input.attention_mask.is_some()
                            || input.attention_bias.is_some()
                            || input.packed_seq_params.is_some(),
                    }
                });
            // The last call's inputs again: its checks passed and its call and choice stand.
            // Answered with cuDNN, its kernel runs directly, without the switches or the choice.
            let hit = key.as_ref().and_then(|k| self.remembered(k));
            if let Some((CUDNN, Some(call))) = hit {
                self.last.store(CUDNN, Ordering::Relaxed);
                let (q, k, v) = (input.query, input.key, input.value);
                return Ok(crate::shim::sdpa_sbhd(q, k, v, CUDNN, &call)?);
            }
            let plain = match hit {
                Some((_, plain)) => plain,
                None => self.inner.plain_call(&input)?,
            };
            let switches = self.backend.switches();
            let _guard = SWITCHES.lock().unwrap_or_else(|p| p.into_inner());
            let previous = crate::shim::sdp_backends();
            crate::shim::set_sdp_backends(switches);
            let choice = match hit {
                Some((choice, _)) => choice,
                None => self.choose(key, &input, plain),
            };
            self.last.store(choice, Ordering::Relaxed);
            let out = match &plain {
                Some(call) => {
                    crate::shim::sdpa_sbhd(input.query, input.key, input.value, choice, call)
                        .map_err(ForwardError::from)
                }
                None => self.inner.forward(&input),
            };
            crate::shim::set_sdp_backends(previous);
            out
        }
        #[cfg(not(feature = "cuda"))]
        self.inner.forward(&input)
    }

    fn max_attention_logits(&self) -> Option<Tensor> {
        self.inner.max_attention_logits()
    }

    fn reset_max_attention_logits(&self) {
        self.inner.reset_max_attention_logits();
    }

    fn backend(&self) -> Option<String> {
        self.last_backend().map(str::to_string)
    }
}

fn build_sdpa_cuda(args: &CoreAttentionArgs<'_>) -> Result<Box<dyn CoreAttention>, SpecError> {
    Ok(Box::new(SdpaCuda::new(args)?))
}

/// The `paged-attention-cuda` kind's params: `kernel` ([`crate::KernelPath`]) and the
/// automatic path's route thresholds, `prompt_route_min_tokens` (a step's trailing prompts'
/// tokens at head dimension 128) and `chunk_route_min_flop` (a continued chunk's attention
/// work), whose defaults were measured on H100 and H200 hosts (`decode::PROMPT_ROUTE_MIN_TOKENS`,
/// `decode::CHUNK_ROUTE_MIN_FLOP`): 0 routes every one, a larger value (`inf` for the FLOP)
/// fewer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PagedCudaParams {
    #[serde(default)]
    kernel: crate::KernelPath,
    #[serde(default)]
    prompt_route_min_tokens: Option<i64>,
    #[serde(default)]
    chunk_route_min_flop: Option<f64>,
}

impl PagedCudaParams {
    /// Refuses a negative threshold or a NaN one.
    fn check(&self, place: &attention_spec::Place) -> Result<(), SpecError> {
        let bad = |message: String| SpecError::Params {
            place: place.key("params"),
            kind: "paged-attention-cuda".into(),
            message,
        };
        if let Some(t) = self.prompt_route_min_tokens.filter(|t| *t < 0) {
            return Err(bad(format!("prompt_route_min_tokens = {t}: must be 0 or more")));
        }
        if let Some(f) = self.chunk_route_min_flop.filter(|f| f.is_nan() || *f < 0.0) {
            return Err(bad(format!("chunk_route_min_flop = {f}: must be 0 or more")));
        }
        Ok(())
    }
}

fn build_paged_cuda(args: &CoreAttentionArgs<'_>) -> Result<Box<dyn CoreAttention>, SpecError> {
    let params: PagedCudaParams = args.params.decode("paged-attention-cuda")?;
    params.check(&args.params.place)?;
    #[cfg(feature = "cuda")]
    {
        use crate::decode::{CHUNK_ROUTE_MIN_FLOP, CudaPagedAttention, PROMPT_ROUTE_MIN_TOKENS};
        let scale =
            args.config.softmax_scale.unwrap_or(1.0 / (args.config.kv_channels as f64).sqrt());
        let route = (
            params.prompt_route_min_tokens.unwrap_or(PROMPT_ROUTE_MIN_TOKENS),
            params.chunk_route_min_flop.unwrap_or(CHUNK_ROUTE_MIN_FLOP),
        );
        Ok(Box::new(
            CudaPagedAttention::new(scale)
                .with_path(params.kernel)
                .with_route_thresholds(route.0, route.1),
        ))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = params.kernel; // validated, unused without CUDA
        Err(SpecError::Unsupported {
            place: args.params.place.clone(),
            what: "paged-attention-cuda needs attention-cuda built with the `cuda` feature".into(),
        })
    }
}

inventory::submit! {
    ModuleFactory {
        kind: "sdpa-cuda",
        aliases: &[],
        summary: "libtorch SDPA on CUDA with the backend from the spec; packed sequences via varlen flash",
        registered_in: module_path!(),
        builder: Builder::CoreAttention(build_sdpa_cuda),
    }
}

inventory::submit! {
    ModuleFactory {
        kind: "paged-attention-cuda",
        aliases: &[],
        summary: "CUDA flash_decode_and_prefill: varlen decode + prefill over a paged KV block table",
        registered_in: module_path!(),
        builder: Builder::CoreAttention(build_paged_cuda),
    }
}
