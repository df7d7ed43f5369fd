//! Input checks shared by the modules: every forward validates shapes, dtypes and devices
//! before it runs a kernel, and reports what is wrong with a typed [`ForwardError`].

use attention_spec::ForwardError;
use attention_spec::module::{CoreAttentionInput, PackedSeqParams};
use tch::{Kind, Tensor};

use crate::mask::{check_bias, check_mask};

/// Sizes of a core-attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreDims {
    /// Query length.
    pub sq: i64,
    /// Batch.
    pub b: i64,
    /// Query heads.
    pub np: i64,
    /// Key/value length.
    pub sk: i64,
    /// Key/value heads.
    pub ngp: i64,
    /// Head dimension.
    pub hn: i64,
}

fn dims4(name: &'static str, t: &Tensor, expected: &str) -> Result<[i64; 4], ForwardError> {
    match t.size().as_slice() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        other => Err(ForwardError::Shape { name, expected: expected.into(), got: other.to_vec() }),
    }
}

/// A floating dtype libtorch attention supports.
pub fn check_float(name: &'static str, t: &Tensor) -> Result<(), ForwardError> {
    match t.kind() {
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => Ok(()),
        got => Err(ForwardError::Dtype {
            name,
            expected: "float32, float64, float16 or bfloat16".into(),
            got,
        }),
    }
}

/// Validates a core-attention input and returns its sizes.
pub fn check_core_input(input: &CoreAttentionInput<'_>) -> Result<CoreDims, ForwardError> {
    let [sq, b, np, hn] = dims4("query", input.query, "[sq, b, np, hn]")?;
    let [sk, bk, ngp, hk] = dims4("key", input.key, "[sk, b, ngp, hn]")?;
    check_float("query", input.query)?;
    let device = input.query.device();
    for (name, t) in [("key", input.key), ("value", input.value)] {
        if t.kind() != input.query.kind() {
            return Err(ForwardError::Dtype {
                name,
                expected: format!("{:?} (the query's dtype)", input.query.kind()),
                got: t.kind(),
            });
        }
        if t.device() != device {
            return Err(ForwardError::Device { name, expected: device, got: t.device() });
        }
    }
    if bk != b || hk != hn {
        return Err(ForwardError::Shape {
            name: "key",
            expected: format!("[sk, b = {b}, ngp, hn = {hn}]"),
            got: input.key.size(),
        });
    }
    if input.value.size() != input.key.size() {
        return Err(ForwardError::Shape {
            name: "value",
            expected: format!("the key's shape {:?}", input.key.size()),
            got: input.value.size(),
        });
    }
    if ngp == 0 || np % ngp != 0 {
        return Err(ForwardError::Invalid {
            name: "key",
            reason: format!("{np} query heads are not a multiple of {ngp} key/value heads"),
        });
    }
    if let Some(mask) = input.attention_mask {
        check_mask(mask, b, np, sq, sk, device)?;
    }
    if let Some(bias) = input.attention_bias {
        check_bias(bias, b, np, sq, sk, device)?;
    }
    if let Some(packed) = input.packed_seq_params {
        check_packed(packed, b)?;
    }
    Ok(CoreDims { sq, b, np, sk, ngp, hn })
}

/// Packed sequences need batch 1 and integer `cu_seqlens` of at least two entries.
pub fn check_packed(packed: &PackedSeqParams, b: i64) -> Result<(), ForwardError> {
    if b != 1 {
        return Err(ForwardError::Invalid {
            name: "packed_seq_params",
            reason: format!("packed (THD) sequences need batch size 1, got {b}"),
        });
    }
    for (name, cu) in
        [("cu_seqlens_q", &packed.cu_seqlens_q), ("cu_seqlens_kv", &packed.cu_seqlens_kv)]
    {
        if !matches!(cu.kind(), Kind::Int | Kind::Int64) {
            return Err(ForwardError::Dtype {
                name,
                expected: "int32 or int64".into(),
                got: cu.kind(),
            });
        }
        if cu.dim() != 1 || cu.size()[0] < 2 {
            return Err(ForwardError::Shape {
                name,
                expected: "[n + 1] with n >= 1".into(),
                got: cu.size(),
            });
        }
    }
    if packed.cu_seqlens_q.size() != packed.cu_seqlens_kv.size() {
        return Err(ForwardError::Shape {
            name: "cu_seqlens_kv",
            expected: format!("as many sequences as cu_seqlens_q {:?}", packed.cu_seqlens_q.size()),
            got: packed.cu_seqlens_kv.size(),
        });
    }
    Ok(())
}
