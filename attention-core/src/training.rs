//! Training extras of Megatron's attention: QK-Clip ([`clip_linear_qkv`], the max-logit
//! tracker), the realtime consistency checks ([`Communicator`], [`digest`]) and their error
//! type. `SelfAttention` exposes them as `clip_qk`, `run_realtime_tests`, `backward_dw` and
//! `set_for_recompute_input_layernorm`.

use std::sync::{Arc, Condvar, Mutex};

use attention_spec::ForwardError;
use tch::{Kind, Tensor};

/// Why a training-side call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainingError {
    /// `clip_qk` with `qk_clip` off (Megatron: `ValueError`).
    #[error("qk_clip option needs to be enabled")]
    QkClipDisabled,
    /// `clip_qk` before any training forward recorded logits (Megatron: `ValueError`).
    #[error(
        "current_max_attn_logits is None: no training forward recorded attention logits since the last clip"
    )]
    NoLogitsRecorded,
    /// The recorded logits have another shape than the heads of this partition.
    #[error("max attention logits have shape {got:?}, expected [{expected}]")]
    LogitShape {
        /// Heads of this partition.
        expected: i64,
        /// The recorded shape.
        got: Vec<i64>,
    },
    /// Ranks hold different Q/K-norm weights.
    #[error(
        "realtime test failed: {tensor} differs across the {group} group: rank(s) {diverging:?} disagree with rank {reference}"
    )]
    Diverged {
        /// Which tensor.
        tensor: String,
        /// `data-parallel` or `tensor-parallel`.
        group: &'static str,
        /// The rank whose digest the others are compared with (the lowest).
        reference: usize,
        /// The ranks whose digest differs.
        diverging: Vec<usize>,
    },
    /// The communicator failed.
    #[error("communicator: {0}")]
    Communicator(String),
    /// Megatron's base class does not implement this for this module.
    #[error("{0} is not supported by this module (as in Megatron's base Attention)")]
    Unsupported(&'static str),
    /// A tensor operation failed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

impl From<tch::TchError> for TrainingError {
    fn from(e: tch::TchError) -> Self {
        Self::Forward(ForwardError::Torch(e))
    }
}

/// How `clip_qk` turns per-head maxima into scale factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkClipMode {
    /// Megatron 0.19.2: one `η_g = min(τ / max_{h∈g} m_h, 1)` per key/value group; the group's
    /// query rows scale by `η_g^α`, its key rows by `η_g^(1-α)`.
    PerGroup,
    /// Exact per head: every head's logits shrink by exactly `η_h = min(τ / m_h, 1)`. Key rows
    /// of group `g` scale by `η_g^(1-α)` (`η_g = min_h η_h`), query rows of head `h` by
    /// `η_h / η_g^(1-α)`; for MHA that is `η_h^α` and `η_h^(1-α)`.
    PerHead,
}

/// What `clip_qk` did.
#[derive(Debug)]
pub struct QkClipReport {
    /// The recorded per-head maxima `[np]`.
    pub max_logits: Tensor,
    /// The factor each head's logits were multiplied by `[np]` (1 where below the threshold).
    pub head_factors: Tensor,
    /// Whether any weight changed.
    pub clipped: bool,
}

/// Applies QK-Clip to a fused QKV weight (`[(np + 2 ngp) hn, h]`, grouped per key/value group
/// as Megatron lays it out), in place, from per-head maxima `max_logits` `[np]`. Sizes are
/// those of this tensor-parallel partition, so a shard is clipped with its own heads; the
/// values, biases and norm weights are never touched. Returns the per-head logit factors.
pub fn clip_linear_qkv(
    weight: &Tensor,
    max_logits: &Tensor,
    (np, ngp, hn): (i64, i64, i64),
    threshold: f64,
    alpha: f64,
    mode: QkClipMode,
) -> Result<Tensor, TrainingError> {
    if max_logits.size() != [np] {
        return Err(TrainingError::LogitShape { expected: np, got: max_logits.size() });
    }
    let p = np / ngp;
    let rows = (p + 2) * hn;
    if weight.size().first() != Some(&(ngp * rows)) {
        return Err(TrainingError::Forward(ForwardError::Shape {
            name: "linear_qkv.weight",
            expected: format!("[(np + 2 ngp) hn = {}, h]", ngp * rows),
            got: weight.size(),
        }));
    }
    tch::no_grad(|| -> Result<Tensor, TrainingError> {
        let m = max_logits.f_to_kind(Kind::Double)?.f_to_device(weight.device())?;
        // η_h = min(τ / m_h, 1), per head [np].
        let eta_head = m.f_reciprocal()?.f_mul_scalar(threshold)?.f_clamp_max(1.0)?;
        let eta_group = eta_head.f_view([ngp, p])?.f_amin([1], true)?; // [ngp, 1] = min over heads
        let (q_scale, k_scale, factors) = match mode {
            QkClipMode::PerGroup => {
                let q = eta_group.f_pow_tensor_scalar(alpha)?.f_expand([ngp, p], false)?;
                let k = eta_group.f_pow_tensor_scalar(1.0 - alpha)?;
                (q, k, eta_group.f_expand([ngp, p], false)?.f_reshape([np])?)
            }
            QkClipMode::PerHead => {
                let k = eta_group.f_pow_tensor_scalar(1.0 - alpha)?;
                let q = eta_head.f_view([ngp, p])?.f_div(&k)?;
                (q, k, eta_head.shallow_clone())
            }
        };
        // Row scales of the fused weight: per group [q heads (P hn) | k (hn) | v (hn)].
        let q_rows =
            q_scale.f_unsqueeze(-1)?.f_expand([ngp, p, hn], false)?.f_reshape([ngp, p * hn])?;
        let k_rows = k_scale.f_expand([ngp, hn], false)?;
        let v_rows = Tensor::f_ones([ngp, hn], (Kind::Double, weight.device()))?;
        let scale = Tensor::f_cat(&[&q_rows, &k_rows, &v_rows], 1)?.f_reshape([ngp * rows, 1])?;
        let mut w = weight.shallow_clone();
        let scaled = w.f_to_kind(Kind::Double)?.f_mul(&scale)?.f_to_kind(weight.kind())?;
        w.f_copy_(&scaled)?;
        Ok(factors)
    })
}

/// Per-head maxima of the masked, scaled attention logits seen by training forwards since the
/// last reset (TransformerEngine's `max_logit`: `max over (b, i, j)` of `mask(Q·Kᵀ·scale + bias)`),
/// max-accumulated across micro-batches.
#[derive(Debug, Default)]
pub struct MaxLogitTracker {
    current: Mutex<Option<Tensor>>,
}

impl MaxLogitTracker {
    /// Folds in a batch's per-head maxima `[np]`.
    pub fn record(&self, batch_max: &Tensor) -> Result<(), ForwardError> {
        let batch_max = batch_max.f_detach()?.f_to_kind(Kind::Float)?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *cur = Some(match cur.take() {
            Some(prev) => prev.f_maximum(&batch_max)?,
            None => batch_max,
        });
        Ok(())
    }

    /// The maxima so far, `[np]`.
    pub fn get(&self) -> Option<Tensor> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(Tensor::shallow_clone)
    }

    /// Forgets the maxima (after a clip).
    pub fn reset(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A process group as the realtime checks see it: ranks exchange byte strings.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Every rank's `data`, indexed by rank (all ranks call it together).
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, TrainingError>;
}

/// The group of one rank.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, TrainingError> {
        Ok(vec![data.to_vec()])
    }
}

#[derive(Debug, Default)]
struct Exchange {
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// Completed rounds. A round completes only when every rank has arrived, so a rank waiting
    /// on round `g` reads `result` before round `g + 1` (which needs it) can overwrite it.
    generation: u64,
    result: Vec<Vec<u8>>,
}

/// Ranks living in one process (one thread each), exchanging through shared memory; made by
/// [`ThreadGroup::new`]. For tests and single-process multi-rank runs.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    shared: Arc<(Mutex<Exchange>, Condvar)>,
}

impl ThreadGroup {
    /// One handle per rank of a group of `size`.
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new((
            Mutex::new(Exchange { slots: vec![None; size], ..Exchange::default() }),
            Condvar::new(),
        ));
        (0..size).map(|rank| ThreadGroup { rank, size, shared: shared.clone() }).collect()
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, TrainingError> {
        let (lock, cv) = &*self.shared;
        let poisoned =
            |_| TrainingError::Communicator("a rank panicked while holding the group".into());
        let mut ex = lock.lock().map_err(poisoned)?;
        let generation = ex.generation;
        ex.slots[self.rank] = Some(data.to_vec());
        ex.arrived += 1;
        if ex.arrived == self.size {
            ex.result = ex.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            ex.arrived = 0;
            ex.generation += 1;
            cv.notify_all();
        } else {
            while ex.generation == generation {
                ex = cv.wait(ex).map_err(poisoned)?;
            }
        }
        Ok(ex.result.clone())
    }
}

/// A 64-bit FNV-1a digest of a tensor's dtype, shape and bytes (what ranks exchange instead of
/// whole tensors).
pub fn digest(t: &Tensor) -> Result<u64, ForwardError> {
    const PRIME: u64 = 0x100000001b3;
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    feed(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
    let flat = t
        .f_detach()?
        .f_to_device(tch::Device::Cpu)?
        .f_contiguous()?
        .f_view_dtype(Kind::Uint8)?
        .f_flatten(0, -1)?;
    let bytes = Vec::<u8>::try_from(&flat)?;
    feed(&bytes);
    Ok(h)
}

/// Compares `named` tensors across the ranks of `group` by digest; errors name the ranks that
/// differ from the lowest rank.
pub fn compare_across(
    group: &dyn Communicator,
    group_name: &'static str,
    named: &[(&str, &Tensor)],
) -> Result<(), TrainingError> {
    let mut payload = Vec::with_capacity(8 * named.len());
    for (_, t) in named {
        payload.extend_from_slice(&digest(t)?.to_le_bytes());
    }
    let all = group.all_gather(&payload)?;
    for (i, (name, _)) in named.iter().enumerate() {
        let at = |r: &Vec<u8>| r.get(8 * i..8 * i + 8).map(<[u8]>::to_vec);
        let reference = at(&all[0]);
        let diverging: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, r)| at(r) != reference)
            .map(|(rank, _)| rank)
            .collect();
        if !diverging.is_empty() {
            return Err(TrainingError::Diverged {
                tensor: (*name).to_string(),
                group: group_name,
                reference: 0,
                diverging,
            });
        }
    }
    Ok(())
}
