//! `SelfAttention` and `CrossAttention`: Megatron-Core's attention layers, built from a resolved
//! spec, with Megatron's parameter names, layouts and forward semantics.
//!
//! # Layout
//!
//! Activations are sequence-first, `[s, b, h]`, as in Megatron. The fused `linear_qkv` weight is
//! `[(nh + 2·ng)·hn, h]`, grouped per key/value group: for each group `g`, its `nh/ng` query
//! heads, then its key head, then its value head (`hn` rows each). Cross attention's
//! `linear_kv` is `[2·nh·hn, h]`, per head `[k_i | v_i]`. `linear_proj` is `[h, nh·hn]` and its
//! bias is returned, not added.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use attention_spec::module::{
    AttentionType, CoreAttention, CoreAttentionInput, Linear, Norm, PackedSeqParams,
};
use attention_spec::registry::{Builder, CoreAttentionArgs, LinearArgs, NormArgs};
use attention_spec::spec::{
    AttentionSubmodules, CrossAttentionSubmodules, ResolvedAttention, ResolvedModule,
    SelfAttentionSubmodules,
};
use attention_spec::{AttnMaskType, ForwardError, SpecError, TransformerConfig};
use tch::{Device, Kind, Tensor, nn};

use crate::check::{check_float, check_packed};
use crate::mask::{check_bias, check_mask, token_sequences};
use crate::recompute::{Recomputable, checkpoint};
use crate::rotary::apply_rotary_pos_emb;
use crate::training::{
    Communicator, QkClipMode, QkClipReport, SingleRank, TrainingError, clip_linear_qkv,
    compare_across,
};

/// The rotary table(s) a forward applies: one for queries and keys, or one each.
#[derive(Debug, Clone, Copy)]
pub enum RotaryPosEmb<'a> {
    /// `[S, 1, 1, rot_dim]`, applied to both queries and keys.
    Shared(&'a Tensor),
    /// Separate tables for queries and keys.
    Separate {
        /// For queries.
        query: &'a Tensor,
        /// For keys.
        key: &'a Tensor,
    },
}

impl<'a> RotaryPosEmb<'a> {
    /// The query table and the key table.
    pub fn pair(self) -> (&'a Tensor, &'a Tensor) {
        match self {
            Self::Shared(t) => (t, t),
            Self::Separate { query, key } => (query, key),
        }
    }
}

/// Inputs of an attention forward (Megatron `Attention.forward`'s arguments).
#[derive(Debug, Clone, Copy)]
pub struct AttentionInput<'a> {
    /// `[sq, b, h]`.
    pub hidden_states: &'a Tensor,
    /// Boolean, true = masked out, broadcastable to `[b, nh, sq, sk]`.
    pub attention_mask: Option<&'a Tensor>,
    /// `[sk, b, h]`: required by cross attention, refused by self attention.
    pub key_value_states: Option<&'a Tensor>,
    /// Rotary table(s) `[S, 1, 1, rot_dim]` with `S >= sq` (`>= sk` for keys); the first
    /// `sq` (`sk`) rows are used; with packed sequences positions restart in every sequence
    /// and `S >= max_seqlen_q` (`max_seqlen_kv`) instead.
    pub rotary_pos_emb: Option<RotaryPosEmb<'a>>,
    /// Added to the scaled scores before the softmax, broadcastable to `[b, nh, sq, sk]`.
    pub attention_bias: Option<&'a Tensor>,
    /// Packed THD sequences (batch 1).
    pub packed_seq_params: Option<&'a PackedSeqParams>,
    /// Training mode (attention dropout). Default false.
    pub training: bool,
}

impl<'a> AttentionInput<'a> {
    /// Just the hidden states; everything else absent, eval mode.
    pub fn new(hidden_states: &'a Tensor) -> Self {
        Self {
            hidden_states,
            attention_mask: None,
            key_value_states: None,
            rotary_pos_emb: None,
            attention_bias: None,
            packed_seq_params: None,
            training: false,
        }
    }

    /// With a boolean mask.
    pub fn with_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// With key/value states (cross attention).
    pub fn with_key_value_states(mut self, kv: &'a Tensor) -> Self {
        self.key_value_states = Some(kv);
        self
    }

    /// With one rotary table for queries and keys.
    pub fn with_rotary(mut self, emb: &'a Tensor) -> Self {
        self.rotary_pos_emb = Some(RotaryPosEmb::Shared(emb));
        self
    }

    /// With an attention bias.
    pub fn with_bias(mut self, bias: &'a Tensor) -> Self {
        self.attention_bias = Some(bias);
        self
    }

    /// With packed sequences.
    pub fn with_packed(mut self, packed: &'a PackedSeqParams) -> Self {
        self.packed_seq_params = Some(packed);
        self
    }

    /// In training or eval mode.
    pub fn training(mut self, training: bool) -> Self {
        self.training = training;
        self
    }
}

/// `(output, bias)` of an attention forward.
#[derive(Debug)]
pub struct AttentionOutput {
    /// `[sq, b, h]`.
    pub output: Tensor,
    /// `linear_proj`'s bias `[h]`, not added (the caller's bias-dropout-add adds it).
    pub bias: Option<Tensor>,
}

/// What [`SelfAttention::get_query_key_value_tensors`] returns.
#[derive(Debug)]
pub enum QkvTensors {
    /// Split, normalized: query `[sq, b, np, hn]`, key and value `[sq, b, ngp, hn]`.
    Split {
        /// Queries.
        query: Tensor,
        /// Keys.
        key: Tensor,
        /// Values.
        value: Tensor,
    },
    /// `split_qkv = false`: the projection viewed as `[sq, b, ngp, (P + 2)·hn]`, with the sizes
    /// of its query, key and value parts along the last dimension.
    Mixed {
        /// The grouped projection.
        mixed: Tensor,
        /// `[P·hn, hn, hn]`.
        split_sizes: [i64; 3],
    },
}

/// Sizes every attention derives from the config (Megatron's `Attention.__init__`).
#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: i64,
    np: i64,
    ngp: i64,
    hn: i64,
}

impl Dims {
    fn new(config: &TransformerConfig) -> Self {
        Self {
            hidden: config.hidden_size,
            np: config.num_attention_heads_per_partition(),
            ngp: config.num_query_groups_per_partition(),
            hn: config.kv_channels,
        }
    }
}

fn build_linear(
    m: &ResolvedModule,
    path: &nn::Path<'_>,
    config: &TransformerConfig,
    sizes: (i64, i64),
    bias: bool,
    skip_bias_add: bool,
    init_std: f64,
) -> Result<Box<dyn Linear>, SpecError> {
    let args = LinearArgs {
        path,
        config,
        params: &m.params,
        input_size: sizes.0,
        output_size: sizes.1,
        bias,
        skip_bias_add,
        init_std,
    };
    match m.factory.builder {
        Builder::ColumnParallelLinear(f) | Builder::RowParallelLinear(f) => f(&args),
        _ => Err(wrong_builder(m)),
    }
}

fn build_core(
    m: &ResolvedModule,
    path: &nn::Path<'_>,
    config: &TransformerConfig,
    layer_number: i64,
    attn_mask_type: AttnMaskType,
    attention_type: AttentionType,
) -> Result<Arc<dyn CoreAttention>, SpecError> {
    let args = CoreAttentionArgs {
        path,
        config,
        params: &m.params,
        layer_number,
        attn_mask_type,
        attention_type,
    };
    match m.factory.builder {
        Builder::CoreAttention(f) => Ok(Arc::from(f(&args)?)),
        _ => Err(wrong_builder(m)),
    }
}

fn build_norm(
    m: &ResolvedModule,
    path: &nn::Path<'_>,
    config: &TransformerConfig,
) -> Result<Box<dyn Norm>, SpecError> {
    let args = NormArgs {
        path,
        config,
        params: &m.params,
        hidden_size: config.kv_channels,
        eps: config.layernorm_epsilon,
    };
    match m.factory.builder {
        Builder::Norm(f) => f(&args),
        _ => Err(wrong_builder(m)),
    }
}

fn wrong_builder(m: &ResolvedModule) -> SpecError {
    // Resolution checks roles, so this only happens with a hand-made ResolvedModule.
    SpecError::Incompatible {
        place: m.place.clone(),
        reason: format!(
            "kind \"{}\" is a {}, which does not fit this slot",
            m.kind(),
            m.factory.role()
        ),
    }
}

/// Checks shared by both attentions, run before any kernel.
fn check_hidden(
    name: &'static str,
    t: &Tensor,
    dims: &Dims,
    kind: Kind,
    device: Device,
) -> Result<(i64, i64), ForwardError> {
    let size = t.size();
    let &[s, b, h] = size.as_slice() else {
        return Err(ForwardError::Shape {
            name,
            expected: format!("[s, b, h = {}]", dims.hidden),
            got: size,
        });
    };
    if h != dims.hidden {
        return Err(ForwardError::Shape {
            name,
            expected: format!("[s, b, h = {}]", dims.hidden),
            got: size,
        });
    }
    check_float(name, t)?;
    if t.kind() != kind {
        return Err(ForwardError::Dtype {
            name,
            expected: format!("{kind:?} (the parameters' dtype)"),
            got: t.kind(),
        });
    }
    if t.device() != device {
        return Err(ForwardError::Device { name, expected: device, got: t.device() });
    }
    Ok((s, b))
}

/// `s` is the number of positions the table must cover: the sequence length, or for packed
/// sequences the longest one (`max_seqlen_q` / `max_seqlen_kv`), since positions restart in
/// every sequence.
fn check_rotary(
    emb: &Tensor,
    name: &'static str,
    s: i64,
    hn: i64,
    device: Device,
) -> Result<(), ForwardError> {
    let size = emb.size();
    let ok =
        matches!(size.as_slice(), &[len, 1, 1, d] if d >= 2 && d % 2 == 0 && d <= hn && len >= s);
    if !ok {
        return Err(ForwardError::Shape {
            name,
            expected: format!(
                "[S >= {s}, 1, 1, rot_dim] with rot_dim even and <= kv_channels = {hn}"
            ),
            got: size,
        });
    }
    check_float(name, emb)?;
    if emb.device() != device {
        return Err(ForwardError::Device { name, expected: device, got: emb.device() });
    }
    Ok(())
}

/// Validates everything an attention forward receives; returns `(sq, b, sk)`.
fn check_input(
    input: &AttentionInput<'_>,
    dims: &Dims,
    kind: Kind,
    device: Device,
    cross: bool,
) -> Result<(i64, i64, i64), ForwardError> {
    let (sq, b) = check_hidden("hidden_states", input.hidden_states, dims, kind, device)?;
    let sk = match (cross, input.key_value_states) {
        (true, Some(kv)) => {
            let (sk, bk) = check_hidden("key_value_states", kv, dims, kind, device)?;
            if bk != b {
                return Err(ForwardError::Shape {
                    name: "key_value_states",
                    expected: format!("[sk, b = {b}, h = {}]", dims.hidden),
                    got: kv.size(),
                });
            }
            sk
        }
        (true, None) => {
            return Err(ForwardError::Invalid {
                name: "key_value_states",
                reason: "cross attention needs key_value_states [sk, b, h]".into(),
            });
        }
        (false, Some(_)) => {
            return Err(ForwardError::Invalid {
                name: "key_value_states",
                reason: "self attention takes its keys and values from hidden_states".into(),
            });
        }
        (false, None) => sq,
    };
    if let Some(mask) = input.attention_mask {
        check_mask(mask, b, dims.np, sq, sk, device)?;
    }
    if let Some(bias) = input.attention_bias {
        check_bias(bias, b, dims.np, sq, sk, device)?;
    }
    if let Some(p) = input.packed_seq_params {
        check_packed(p, b)?;
    }
    if let Some(rope) = input.rotary_pos_emb {
        let (q, k) = rope.pair();
        // Packed sequences index the table by position within their sequence.
        let (lq, lk) = match input.packed_seq_params {
            Some(p) => (p.max_seqlen_q, p.max_seqlen_kv),
            None => (sq, sk),
        };
        check_rotary(q, "rotary_pos_emb (query)", lq, dims.hn, device)?;
        check_rotary(k, "rotary_pos_emb (key)", lk, dims.hn, device)?;
    }
    Ok((sq, b, sk))
}

/// Rotates `t` (`[s, b, heads, hn]`) with the first `s` rows of `emb`, or, for packed
/// sequences, with each token's position inside its sequence.
fn rotate(
    t: &Tensor,
    emb: &Tensor,
    cu: Option<&Tensor>,
    interleaved: bool,
) -> Result<Tensor, ForwardError> {
    let s = t.size()[0];
    let freqs = match cu {
        None => emb.f_narrow(0, 0, s)?,
        Some(cu) => {
            let cu = cu.f_to_device(t.device())?.f_to_kind(Kind::Int64)?;
            let (_, pos, _) = token_sequences(&cu, s, t.device())?;
            emb.f_index_select(0, &pos)?
        }
    };
    apply_rotary_pos_emb(t, &freqs, interleaved)
}

/// A copy of packed-sequence metadata sharing the tensors (for a recompute closure).
fn share_packed(p: &PackedSeqParams) -> PackedSeqParams {
    PackedSeqParams {
        cu_seqlens_q: p.cu_seqlens_q.shallow_clone(),
        cu_seqlens_kv: p.cu_seqlens_kv.shallow_clone(),
        max_seqlen_q: p.max_seqlen_q,
        max_seqlen_kv: p.max_seqlen_kv,
    }
}

/// The core attention, through selective recompute (Megatron's
/// `_checkpointed_attention_forward`) when the config asks for it in training: the forward
/// keeps only query, key, value (and bias); backward recomputes the probabilities.
fn core_attention_forward(
    config: &TransformerConfig,
    core_attention: &Arc<dyn CoreAttention>,
    input: &CoreAttentionInput<'_>,
) -> Result<Tensor, ForwardError> {
    if !(config.checkpoint_core_attention() && input.training) {
        return core_attention.forward(input);
    }
    let core = core_attention.clone();
    let mask = input.attention_mask.map(Tensor::shallow_clone);
    let packed = input.packed_seq_params.map(share_packed);
    let (mask_type, has_bias) = (input.attn_mask_type, input.attention_bias.is_some());
    let f: Recomputable = Box::new(move |t: &[Tensor]| {
        core.forward(&CoreAttentionInput {
            query: &t[0],
            key: &t[1],
            value: &t[2],
            attention_mask: mask.as_ref(),
            attn_mask_type: mask_type,
            attention_bias: if has_bias { t.get(3) } else { None },
            packed_seq_params: packed.as_ref(),
            training: true,
        })
    });
    let mut inputs = vec![input.query, input.key, input.value];
    inputs.extend(input.attention_bias);
    checkpoint(f, &inputs)
}

/// Steps shared by both attentions after the projections: rotary, core attention, `linear_proj`.
fn attend(
    config: &TransformerConfig,
    core_attention: &Arc<dyn CoreAttention>,
    linear_proj: &dyn Linear,
    attn_mask_type: AttnMaskType,
    (query, key, value): (Tensor, Tensor, Tensor),
    input: &AttentionInput<'_>,
) -> Result<AttentionOutput, ForwardError> {
    let (query, key) = match input.rotary_pos_emb {
        None => (query, key),
        Some(rope) => {
            let (q_emb, k_emb) = rope.pair();
            let packed = input.packed_seq_params;
            (
                rotate(&query, q_emb, packed.map(|p| &p.cu_seqlens_q), config.rotary_interleaved)?,
                rotate(&key, k_emb, packed.map(|p| &p.cu_seqlens_kv), config.rotary_interleaved)?,
            )
        }
    };
    let core_input = CoreAttentionInput {
        query: &query,
        key: &key,
        value: &value,
        attention_mask: input.attention_mask,
        attn_mask_type,
        attention_bias: input.attention_bias,
        packed_seq_params: input.packed_seq_params,
        training: input.training,
    };
    let core_out = core_attention_forward(config, core_attention, &core_input)?;
    let (output, bias) = linear_proj.forward(&core_out)?;
    Ok(AttentionOutput { output, bias })
}

fn param_kind_device(linear: &dyn Linear) -> (Kind, Device) {
    let w = linear.weight();
    (w.kind(), w.device())
}

/// Megatron's `SelfAttention`: input `[s, b, h]`, output `[s, b, h]`.
#[derive(Debug)]
pub struct SelfAttention {
    config: TransformerConfig,
    layer_number: i64,
    attn_mask_type: AttnMaskType,
    dims: Dims,
    linear_qkv: Box<dyn Linear>,
    core_attention: Arc<dyn CoreAttention>,
    linear_proj: Box<dyn Linear>,
    q_layernorm: Option<Box<dyn Norm>>,
    k_layernorm: Option<Box<dyn Norm>>,
    /// Data-parallel and tensor-parallel groups of `run_realtime_tests`.
    realtime_groups: (Arc<dyn Communicator>, Arc<dyn Communicator>),
    recompute_input_layernorm: AtomicBool,
}

impl SelfAttention {
    /// Builds the attention and its submodules; parameters go under `path` with Megatron's
    /// names (`linear_qkv.weight`, `q_layernorm.weight`, ...).
    pub fn new(
        path: &nn::Path<'_>,
        config: &TransformerConfig,
        submodules: &SelfAttentionSubmodules,
        layer_number: i64,
        attn_mask_type: AttnMaskType,
    ) -> Result<Self, SpecError> {
        let dims = Dims::new(config);
        let qkv_out = config.query_projection_size() + 2 * config.kv_projection_size();
        let linear_qkv = build_linear(
            &submodules.linear_qkv,
            &(path / "linear_qkv"),
            config,
            (config.hidden_size, qkv_out),
            config.add_bias_linear || config.add_qkv_bias,
            false,
            config.init_method_std,
        )?;
        let core_attention = build_core(
            &submodules.core_attention,
            &(path / "core_attention"),
            config,
            layer_number,
            attn_mask_type,
            AttentionType::SelfAttention,
        )?;
        let linear_proj = build_linear(
            &submodules.linear_proj,
            &(path / "linear_proj"),
            config,
            (config.query_projection_size(), config.hidden_size),
            config.add_bias_linear,
            true,
            config.output_layer_init_std(),
        )?;
        let norm =
            |m: &Option<ResolvedModule>, name: &str| -> Result<Option<Box<dyn Norm>>, SpecError> {
                m.as_ref().map(|m| build_norm(m, &(path / name), config)).transpose()
            };
        let q_layernorm = norm(&submodules.q_layernorm, "q_layernorm")?;
        let k_layernorm = norm(&submodules.k_layernorm, "k_layernorm")?;
        Ok(Self {
            config: config.clone(),
            layer_number,
            attn_mask_type,
            dims,
            linear_qkv,
            core_attention,
            linear_proj,
            q_layernorm,
            k_layernorm,
            realtime_groups: (Arc::new(SingleRank), Arc::new(SingleRank)),
            recompute_input_layernorm: AtomicBool::new(false),
        })
    }

    /// The config the attention was built with.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// Global 1-based layer number.
    pub fn layer_number(&self) -> i64 {
        self.layer_number
    }

    /// The mask type the core attention was built with.
    pub fn attn_mask_type(&self) -> AttnMaskType {
        self.attn_mask_type
    }

    /// `linear_qkv`.
    pub fn linear_qkv(&self) -> &dyn Linear {
        self.linear_qkv.as_ref()
    }

    /// `core_attention`.
    pub fn core_attention(&self) -> &dyn CoreAttention {
        self.core_attention.as_ref()
    }

    /// `linear_proj`.
    pub fn linear_proj(&self) -> &dyn Linear {
        self.linear_proj.as_ref()
    }

    /// `q_layernorm`, if any.
    pub fn q_layernorm(&self) -> Option<&dyn Norm> {
        self.q_layernorm.as_deref()
    }

    /// `k_layernorm`, if any.
    pub fn k_layernorm(&self) -> Option<&dyn Norm> {
        self.k_layernorm.as_deref()
    }

    /// Megatron's `get_query_key_value_tensors(hidden_states, split_qkv)`: the fused projection,
    /// viewed per group and split into query, key and value heads, Q/K norms applied.
    ///
    /// # Shapes
    /// `hidden_states` `[sq, b, h]` → query `[sq, b, np, hn]`, key/value `[sq, b, ngp, hn]`.
    pub fn get_query_key_value_tensors(
        &self,
        hidden_states: &Tensor,
        split_qkv: bool,
    ) -> Result<QkvTensors, ForwardError> {
        let (kind, device) = param_kind_device(self.linear_qkv.as_ref());
        let (sq, b) = check_hidden("hidden_states", hidden_states, &self.dims, kind, device)?;
        self.qkv(hidden_states, sq, b, split_qkv)
    }

    fn qkv(
        &self,
        hidden_states: &Tensor,
        sq: i64,
        b: i64,
        split_qkv: bool,
    ) -> Result<QkvTensors, ForwardError> {
        let Dims { np, ngp, hn, .. } = self.dims;
        let p = np / ngp;
        // 1. [sq, b, (np + 2 ngp) hn] -> [sq, b, ngp, (P + 2) hn].
        let (mixed, _) = self.linear_qkv.forward(hidden_states)?;
        let mixed = mixed.f_view([sq, b, ngp, (p + 2) * hn])?;
        let split_sizes = [p * hn, hn, hn];
        if !split_qkv {
            return Ok(QkvTensors::Mixed { mixed, split_sizes });
        }
        // 2. Split each group into its P query heads, its key and its value.
        let parts = mixed.f_split_with_sizes(split_sizes, 3)?;
        let [q, k, v] = <[Tensor; 3]>::try_from(parts).map_err(|p| ForwardError::Invalid {
            name: "linear_qkv",
            reason: format!("split into {} parts instead of 3", p.len()),
        })?;
        let mut query = q.f_reshape([sq, b, np, hn])?;
        let mut key = k;
        // 3. Per-head norms over hn.
        if let Some(n) = &self.q_layernorm {
            query = n.forward(&query)?;
        }
        if let Some(n) = &self.k_layernorm {
            key = n.forward(&key)?;
        }
        if self.config.test_mode {
            self.run_realtime_tests().map_err(|e| ForwardError::Context(Box::new(e)))?;
        }
        Ok(QkvTensors::Split { query, key, value: v })
    }

    /// Megatron's `forward`: projections, Q/K norms, rotary, core attention, `linear_proj`.
    ///
    /// # Shapes
    /// `hidden_states` `[sq, b, h]` → output `[sq, b, h]`, bias `[h]`.
    pub fn forward(&self, input: &AttentionInput<'_>) -> Result<AttentionOutput, ForwardError> {
        let (kind, device) = param_kind_device(self.linear_qkv.as_ref());
        let (sq, b, _) = check_input(input, &self.dims, kind, device, false)?;
        let QkvTensors::Split { query, key, value } = self.qkv(input.hidden_states, sq, b, true)?
        else {
            unreachable!("split_qkv = true returns split tensors")
        };
        attend(
            &self.config,
            &self.core_attention,
            self.linear_proj.as_ref(),
            self.attn_mask_type,
            (query, key, value),
            input,
        )
    }
}

impl SelfAttention {
    /// Megatron's `forward` with an `inference_context`: projections and Q/K norms here, then
    /// the context stores the new keys and values, applies rotary as its cache requires and
    /// attends over the cached prefix (`_adjust_key_value_for_inference` and the core
    /// attention); `linear_proj` here. `input.rotary_pos_emb` must cover every position the
    /// step touches.
    ///
    /// # Shapes
    /// `hidden_states` `[s, b, h]` (static context) or `[T, 1, h]` (paged context) → output of
    /// the same shape.
    pub fn forward_with_context(
        &self,
        input: &AttentionInput<'_>,
        context: &mut dyn crate::inference::InferenceContext,
    ) -> Result<AttentionOutput, ForwardError> {
        let (kind, device) = param_kind_device(self.linear_qkv.as_ref());
        let (sq, b) = check_hidden("hidden_states", input.hidden_states, &self.dims, kind, device)?;
        if input.key_value_states.is_some() {
            return Err(ForwardError::Invalid {
                name: "key_value_states",
                reason: "self attention takes its keys and values from hidden_states".into(),
            });
        }
        if let Some(rope) = input.rotary_pos_emb {
            let (q, k) = rope.pair();
            check_rotary(q, "rotary_pos_emb (query)", 1, self.dims.hn, device)?;
            check_rotary(k, "rotary_pos_emb (key)", 1, self.dims.hn, device)?;
        }
        let QkvTensors::Split { query, key, value } = self.qkv(input.hidden_states, sq, b, true)?
        else {
            unreachable!("split_qkv = true returns split tensors")
        };
        let layer = crate::inference::LayerContext {
            layer_number: self.layer_number,
            config: &self.config,
            core_attention: self.core_attention.as_ref(),
            attn_mask_type: self.attn_mask_type,
        };
        let core_out =
            context.attend(&layer, crate::inference::Qkv { query, key, value }, input)?;
        let (output, bias) = self.linear_proj.forward(&core_out)?;
        Ok(AttentionOutput { output, bias })
    }
}

/// Training extras (Megatron's `backward_dw`, `clip_qk`, `run_realtime_tests`,
/// `set_for_recompute_input_layernorm`).
impl SelfAttention {
    /// Megatron's `backward_dw`: the delayed weight gradients of `linear_qkv` and `linear_proj`
    /// ([`backward_qkv_proj`](Self::backward_qkv_proj), then
    /// [`backward_output_proj`](Self::backward_output_proj)). With `delay_wgrad_compute` off, or
    /// nothing pending, it does nothing. Returns the number of backward passes processed.
    pub fn backward_dw(&self) -> Result<usize, ForwardError> {
        Ok(self.backward_qkv_proj()? + self.backward_output_proj()?)
    }

    /// Megatron's `_backward_qkv_proj`: `linear_qkv`'s delayed weight gradients.
    pub fn backward_qkv_proj(&self) -> Result<usize, ForwardError> {
        self.linear_qkv.backward_dw()
    }

    /// Megatron's `_backward_output_proj`: `linear_proj`'s delayed weight gradients.
    pub fn backward_output_proj(&self) -> Result<usize, ForwardError> {
        self.linear_proj.backward_dw()
    }

    /// Megatron's `clip_qk` (QK-Clip, per key/value group, exactly Megatron 0.19.2's rule).
    /// See [`clip_qk_with`](Self::clip_qk_with).
    pub fn clip_qk(&self) -> Result<QkClipReport, TrainingError> {
        self.clip_qk_with(QkClipMode::PerGroup)
    }

    /// QK-Clip from the per-head maxima recorded since the last clip: when any exceeds
    /// `qk_clip_threshold`, scales the query and key rows of `linear_qkv` (values, biases and
    /// norm weights untouched), then resets the tracker. Fails as Megatron does when `qk_clip`
    /// is off or nothing was recorded. Works on this layer's tensor-parallel partition with its
    /// own heads.
    pub fn clip_qk_with(&self, mode: QkClipMode) -> Result<QkClipReport, TrainingError> {
        if !self.config.qk_clip {
            return Err(TrainingError::QkClipDisabled);
        }
        let max_logits =
            self.core_attention.max_attention_logits().ok_or(TrainingError::NoLogitsRecorded)?;
        let np = self.dims.np;
        if max_logits.size() != [np] {
            return Err(TrainingError::LogitShape { expected: np, got: max_logits.size() });
        }
        let tau = self.config.qk_clip_threshold;
        let clipped = max_logits.f_gt(tau)?.f_any()?.int64_value(&[]) != 0;
        let head_factors = if clipped {
            clip_linear_qkv(
                self.linear_qkv.weight(),
                &max_logits,
                (np, self.dims.ngp, self.dims.hn),
                tau,
                self.config.qk_clip_alpha,
                mode,
            )?
        } else {
            Tensor::f_ones([np], (Kind::Double, max_logits.device()))?
        };
        self.core_attention.reset_max_attention_logits();
        Ok(QkClipReport { max_logits, head_factors, clipped })
    }

    /// The groups `run_realtime_tests` compares across (default: single ranks).
    pub fn set_realtime_test_groups(
        &mut self,
        data_parallel: Arc<dyn Communicator>,
        tensor_parallel: Arc<dyn Communicator>,
    ) {
        self.realtime_groups = (data_parallel, tensor_parallel);
    }

    /// Megatron's `run_realtime_tests` (run by every forward under `test_mode`): with
    /// `qk_layernorm`, the Q/K-norm parameters must be identical on every rank of the
    /// data-parallel and then the tensor-parallel group. Ranks exchange 64-bit digests instead of
    /// the tensors; a mismatch names the diverging ranks. Without `qk_layernorm` it returns at
    /// once, as Megatron does.
    pub fn run_realtime_tests(&self) -> Result<(), TrainingError> {
        if !self.config.qk_layernorm {
            return Ok(());
        }
        let mut named = Vec::new();
        for (slot, norm) in [("q_layernorm", &self.q_layernorm), ("k_layernorm", &self.k_layernorm)]
        {
            for (param, t) in norm.as_ref().map(|n| n.parameters()).unwrap_or_default() {
                named.push((format!("{slot}.{param}"), t));
            }
        }
        let named: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        compare_across(self.realtime_groups.0.as_ref(), "data-parallel", &named)?;
        compare_across(self.realtime_groups.1.as_ref(), "tensor-parallel", &named)
    }

    /// Megatron's `set_for_recompute_input_layernorm`: `linear_qkv` keeps its high-precision
    /// input for recomputing the input layernorm. Megatron needs this only for fp8/fp4, where
    /// the GEMM would otherwise save a quantized input; this build has no fp8, and its linears
    /// always save their input as it is, so the switch changes no numbers. It is recorded and
    /// reported by [`recompute_input_layernorm`](Self::recompute_input_layernorm).
    pub fn set_for_recompute_input_layernorm(&self) {
        self.recompute_input_layernorm.store(true, Ordering::Relaxed);
    }

    /// Whether [`set_for_recompute_input_layernorm`](Self::set_for_recompute_input_layernorm)
    /// was called.
    pub fn recompute_input_layernorm(&self) -> bool {
        self.recompute_input_layernorm.load(Ordering::Relaxed)
    }
}

/// Megatron's `CrossAttention`: queries from `hidden_states` `[sq, b, h]`, keys and values from
/// `key_value_states` `[sk, b, h]`. No GQA (refused at resolution), no Q/K norms.
#[derive(Debug)]
pub struct CrossAttention {
    config: TransformerConfig,
    layer_number: i64,
    attn_mask_type: AttnMaskType,
    dims: Dims,
    linear_q: Box<dyn Linear>,
    linear_kv: Box<dyn Linear>,
    core_attention: Arc<dyn CoreAttention>,
    linear_proj: Box<dyn Linear>,
}

impl CrossAttention {
    /// Builds the attention; parameters go under `path` (`linear_q.weight`, `linear_kv.weight`,
    /// `linear_proj.weight`, ...).
    pub fn new(
        path: &nn::Path<'_>,
        config: &TransformerConfig,
        submodules: &CrossAttentionSubmodules,
        layer_number: i64,
        attn_mask_type: AttnMaskType,
    ) -> Result<Self, SpecError> {
        if config.num_query_groups != config.num_attention_heads {
            return Err(SpecError::Incompatible {
                place: submodules.linear_kv.place.clone(),
                reason: "group query attention is not supported in cross attention".into(),
            });
        }
        let h = config.hidden_size;
        let linear_q = build_linear(
            &submodules.linear_q,
            &(path / "linear_q"),
            config,
            (h, config.query_projection_size()),
            config.add_bias_linear,
            false,
            config.init_method_std,
        )?;
        let linear_kv = build_linear(
            &submodules.linear_kv,
            &(path / "linear_kv"),
            config,
            (h, 2 * config.kv_projection_size()),
            config.add_bias_linear,
            false,
            config.init_method_std,
        )?;
        let core_attention = build_core(
            &submodules.core_attention,
            &(path / "core_attention"),
            config,
            layer_number,
            attn_mask_type,
            AttentionType::CrossAttention,
        )?;
        let linear_proj = build_linear(
            &submodules.linear_proj,
            &(path / "linear_proj"),
            config,
            (config.query_projection_size(), h),
            config.add_bias_linear,
            true,
            config.output_layer_init_std(),
        )?;
        Ok(Self {
            config: config.clone(),
            layer_number,
            attn_mask_type,
            dims: Dims::new(config),
            linear_q,
            linear_kv,
            core_attention,
            linear_proj,
        })
    }

    /// The config the attention was built with.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// Global 1-based layer number.
    pub fn layer_number(&self) -> i64 {
        self.layer_number
    }

    /// `core_attention`.
    pub fn core_attention(&self) -> &dyn CoreAttention {
        self.core_attention.as_ref()
    }

    /// Not supported, as in Megatron's base `Attention` (`NotImplementedError`).
    pub fn set_for_recompute_input_layernorm(&self) -> Result<(), TrainingError> {
        Err(TrainingError::Unsupported("set_for_recompute_input_layernorm"))
    }

    /// Not supported: Megatron's `CrossAttention` has no QK-Clip.
    pub fn clip_qk(&self) -> Result<QkClipReport, TrainingError> {
        Err(TrainingError::Unsupported("clip_qk"))
    }

    /// Megatron's `get_query_key_value_tensors(hidden_states, key_value_states)`: query
    /// `[sq, b, np, hn]` from `linear_q`, key and value `[sk, b, np, hn]` from the per-head
    /// `[k | v]` halves of `linear_kv`.
    pub fn get_query_key_value_tensors(
        &self,
        hidden_states: &Tensor,
        key_value_states: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), ForwardError> {
        let (kind, device) = param_kind_device(self.linear_q.as_ref());
        let (sq, b) = check_hidden("hidden_states", hidden_states, &self.dims, kind, device)?;
        let (sk, _) = check_hidden("key_value_states", key_value_states, &self.dims, kind, device)?;
        self.qkv(hidden_states, key_value_states, sq, sk, b)
    }

    fn qkv(
        &self,
        hidden: &Tensor,
        kv: &Tensor,
        sq: i64,
        sk: i64,
        b: i64,
    ) -> Result<(Tensor, Tensor, Tensor), ForwardError> {
        let Dims { np, hn, .. } = self.dims;
        let (mixed_kv, _) = self.linear_kv.forward(kv)?;
        let mixed_kv = mixed_kv.f_view([sk, b, np, 2 * hn])?;
        let key = mixed_kv.f_narrow(-1, 0, hn)?;
        let value = mixed_kv.f_narrow(-1, hn, hn)?;
        let (query, _) = self.linear_q.forward(hidden)?;
        let query = query.f_view([sq, b, np, hn])?;
        Ok((query, key, value))
    }

    /// Megatron's `forward` for cross attention.
    ///
    /// # Shapes
    /// `hidden_states` `[sq, b, h]`, `key_value_states` `[sk, b, h]` → output `[sq, b, h]`.
    pub fn forward(&self, input: &AttentionInput<'_>) -> Result<AttentionOutput, ForwardError> {
        let (kind, device) = param_kind_device(self.linear_q.as_ref());
        let (sq, b, sk) = check_input(input, &self.dims, kind, device, true)?;
        let kv = input.key_value_states.ok_or(ForwardError::Invalid {
            name: "key_value_states",
            reason: "cross attention needs key_value_states".into(),
        })?;
        let qkv = self.qkv(input.hidden_states, kv, sq, sk, b)?;
        attend(
            &self.config,
            &self.core_attention,
            self.linear_proj.as_ref(),
            self.attn_mask_type,
            qkv,
            input,
        )
    }
}

/// A self or a cross attention, as a resolved spec describes.
#[derive(Debug)]
pub enum Attention {
    /// Self attention.
    SelfAttention(SelfAttention),
    /// Cross attention.
    CrossAttention(CrossAttention),
}

impl Attention {
    /// Builds the attention a resolved spec describes, parameters under `path`.
    pub fn build(
        path: &nn::Path<'_>,
        config: &TransformerConfig,
        spec: &ResolvedAttention,
        layer_number: i64,
    ) -> Result<Self, SpecError> {
        Ok(match &spec.submodules {
            AttentionSubmodules::SelfAttention(s) => Self::SelfAttention(SelfAttention::new(
                path,
                config,
                s,
                layer_number,
                spec.attn_mask_type,
            )?),
            AttentionSubmodules::CrossAttention(c) => Self::CrossAttention(CrossAttention::new(
                path,
                config,
                c,
                layer_number,
                spec.attn_mask_type,
            )?),
        })
    }

    /// Forward of whichever attention this is.
    pub fn forward(&self, input: &AttentionInput<'_>) -> Result<AttentionOutput, ForwardError> {
        match self {
            Self::SelfAttention(a) => a.forward(input),
            Self::CrossAttention(a) => a.forward(input),
        }
    }

    /// The config.
    pub fn config(&self) -> &TransformerConfig {
        match self {
            Self::SelfAttention(a) => a.config(),
            Self::CrossAttention(a) => a.config(),
        }
    }

    /// Whether this is a cross attention.
    pub fn is_cross(&self) -> bool {
        matches!(self, Self::CrossAttention(_))
    }
}
