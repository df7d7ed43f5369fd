//! Masks shared by the core attentions: the cached causal mask, the block-diagonal mask of
//! packed (THD) sequences, and input checks for caller masks and biases.

use std::collections::HashMap;
use std::sync::Mutex;

use attention_spec::ForwardError;
use attention_spec::module::PackedSeqParams;
use tch::{Device, Kind, Tensor};

/// Megatron's `get_default_causal_mask(sq)`: `triu(ones(sq, sq), 1)` as bool (true = masked),
/// cached per length and device so steady-state forwards build nothing.
#[derive(Debug, Default)]
pub struct CausalMaskCache {
    masks: Mutex<HashMap<(i64, Device), Tensor>>,
}

impl CausalMaskCache {
    /// The `[sq, sq]` mask.
    pub fn get(&self, sq: i64, device: Device) -> Tensor {
        let mut masks = self.masks.lock().unwrap_or_else(|p| p.into_inner());
        masks
            .entry((sq, device))
            .or_insert_with(|| Tensor::ones([sq, sq], (Kind::Bool, device)).triu(1))
            .shallow_clone()
    }
}

/// The `[1, 1, tq, tk]` mask (true = masked) of packed sequences: token `i` of the queries and
/// token `j` of the keys see each other only inside the same sequence; with `causal`, key `j`
/// is also hidden when it lies after query `i` (bottom-right aligned within the sequence, which
/// for equal query and key lengths is the usual causal mask). Built on the device, with no host
/// synchronisation.
pub fn packed_mask(
    packed: &PackedSeqParams,
    tq: i64,
    tk: i64,
    causal: bool,
    device: Device,
) -> Result<Tensor, ForwardError> {
    let cu_q = packed.cu_seqlens_q.f_to_device(device)?.f_to_kind(Kind::Int64)?;
    let cu_k = packed.cu_seqlens_kv.f_to_device(device)?.f_to_kind(Kind::Int64)?;
    let (seq_q, pos_q, len_q) = token_sequences(&cu_q, tq, device)?;
    let (seq_k, pos_k, len_k) = token_sequences(&cu_k, tk, device)?;
    let other = seq_q.f_unsqueeze(1)?.f_ne_tensor(&seq_k.f_unsqueeze(0)?)?;
    let mask = if causal {
        // Key j is after query i when pos_k(j) > pos_q(i) + (len_k - len_q) of i's sequence.
        let shift = len_k
            .f_index_select(0, &seq_q.f_clamp_max(len_k.size()[0] - 1)?)?
            .f_sub(&len_q.f_index_select(0, &seq_q.f_clamp_max(len_q.size()[0] - 1)?)?)?;
        let limit = pos_q.f_add(&shift)?;
        let future = pos_k.f_unsqueeze(0)?.f_gt_tensor(&limit.f_unsqueeze(1)?)?;
        other.f_logical_or(&future)?
    } else {
        other
    };
    Ok(mask.f_reshape([1, 1, tq, tk])?)
}

/// For `t` tokens packed by `cu` (`[n + 1]`): each token's sequence index, its position within
/// the sequence, and the length of every sequence.
pub fn token_sequences(
    cu: &Tensor,
    t: i64,
    device: Device,
) -> Result<(Tensor, Tensor, Tensor), ForwardError> {
    let n = cu.size()[0] - 1;
    let tokens = Tensor::f_arange(t, (Kind::Int64, device))?;
    let ends = cu.f_narrow(0, 1, n)?;
    let seq = tokens.f_searchsorted(&ends, false, true, "right", None::<Tensor>)?;
    let starts = cu.f_narrow(0, 0, n)?;
    let start = starts.f_index_select(0, &seq.f_clamp_max((n - 1).max(0))?)?;
    let pos = tokens.f_sub(&start)?;
    let len = ends.f_sub(&starts)?;
    Ok((seq, pos, len))
}

/// Checks that `mask` is a bool tensor broadcastable to `[b, np, sq, sk]` on `device`.
pub fn check_mask(
    mask: &Tensor,
    b: i64,
    np: i64,
    sq: i64,
    sk: i64,
    device: Device,
) -> Result<(), ForwardError> {
    if mask.kind() != Kind::Bool {
        return Err(ForwardError::Dtype {
            name: "attention_mask",
            expected: "bool (true = masked out)".into(),
            got: mask.kind(),
        });
    }
    check_broadcast("attention_mask", mask, b, np, sq, sk)?;
    if mask.device() != device {
        return Err(ForwardError::Device {
            name: "attention_mask",
            expected: device,
            got: mask.device(),
        });
    }
    Ok(())
}

/// Checks that `bias` is a floating tensor broadcastable to `[b, np, sq, sk]` on `device`.
pub fn check_bias(
    bias: &Tensor,
    b: i64,
    np: i64,
    sq: i64,
    sk: i64,
    device: Device,
) -> Result<(), ForwardError> {
    if !bias.is_floating_point() {
        return Err(ForwardError::Dtype {
            name: "attention_bias",
            expected: "a floating dtype".into(),
            got: bias.kind(),
        });
    }
    check_broadcast("attention_bias", bias, b, np, sq, sk)?;
    if bias.device() != device {
        return Err(ForwardError::Device {
            name: "attention_bias",
            expected: device,
            got: bias.device(),
        });
    }
    Ok(())
}

fn check_broadcast(
    name: &'static str,
    t: &Tensor,
    b: i64,
    np: i64,
    sq: i64,
    sk: i64,
) -> Result<(), ForwardError> {
    let size = t.size();
    let want = [b, np, sq, sk];
    let ok = size.len() == 4 && size.iter().zip(want).all(|(&s, w)| s == w || s == 1);
    if ok {
        Ok(())
    } else {
        Err(ForwardError::Shape {
            name,
            expected: format!("broadcastable to [b, np, sq, sk] = {want:?} (each dim equal or 1)"),
            got: size,
        })
    }
}

/// The mask a core attention applies (true = masked), following Megatron's local attention:
/// packed sequences get their block-diagonal mask (causal inside each sequence for `causal`
/// and `padding_causal`), OR-ed with a caller mask; otherwise a caller mask is used as given;
/// otherwise a `causal` attention with `sq > 1` builds the default causal mask (which needs
/// `sq == sk`); otherwise there is no mask (a causal single-token query sees every key).
pub fn effective_mask(
    input: &attention_spec::module::CoreAttentionInput<'_>,
    mask_type: attention_spec::AttnMaskType,
    dims: &crate::check::CoreDims,
    causal_cache: &CausalMaskCache,
) -> Result<Option<Tensor>, ForwardError> {
    use attention_spec::AttnMaskType;
    let device = input.query.device();
    if let Some(packed) = input.packed_seq_params {
        let causal = matches!(mask_type, AttnMaskType::Causal | AttnMaskType::PaddingCausal);
        let m = packed_mask(packed, dims.sq, dims.sk, causal, device)?;
        return Ok(Some(match input.attention_mask {
            Some(user) => m.f_logical_or(user)?,
            None => m,
        }));
    }
    if let Some(user) = input.attention_mask {
        return Ok(Some(user.shallow_clone()));
    }
    if mask_type == AttnMaskType::Causal && dims.sq > 1 {
        check_causal_square(dims)?;
        return Ok(Some(causal_cache.get(dims.sq, device)));
    }
    Ok(None)
}

/// Megatron's "causal mask is only for self attention" assertion (`sq == sk`).
pub fn check_causal_square(dims: &crate::check::CoreDims) -> Result<(), ForwardError> {
    if dims.sq != dims.sk {
        return Err(ForwardError::Invalid {
            name: "attn_mask_type",
            reason: format!(
                "the default causal mask needs sq == sk, got sq = {} and sk = {}; pass an \
                 attention_mask for other shapes",
                dims.sq, dims.sk
            ),
        });
    }
    Ok(())
}
