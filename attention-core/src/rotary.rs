//! Rotary position embeddings: Megatron's `RotaryEmbedding` (the frequency table the attention
//! receives as `rotary_pos_emb`) and the unfused `_apply_rotary_pos_emb_bshd`.
//!
//! The table is `[s, 1, 1, rot_dim]` fp32, `rot_dim = int(kv_channels * rotary_percent)` (or
//! `kv_channels`), built as `outer(positions, inv_freq)` with
//! `inv_freq = 1 / base ** (arange(0, rot_dim, 2) / rot_dim)` and laid out `[f, f]`
//! (rotate-half) or `[f0, f0, f1, f1, ...]` (interleaved). Application computes `cos`/`sin` in
//! fp32, rounds them to the activation dtype, and rotates the first `rot_dim` channels of each
//! head; the rest pass through.

use std::collections::VecDeque;
use std::sync::Mutex;

use attention_spec::{ForwardError, TransformerConfig};
use tch::{Device, Kind, Tensor};

/// How many `(length, offset)` tables a [`RotaryEmbedding`] keeps (Megatron's `lru_cache(32)`).
const CACHE_SIZE: usize = 32;

type CacheKey = (i64, i64, Device);

/// Megatron's `RotaryEmbedding`: builds (and caches by length and offset) rotary tables.
#[derive(Debug)]
pub struct RotaryEmbedding {
    inv_freq: Tensor,
    rotary_interleaved: bool,
    seq_len_interpolation_factor: Option<f64>,
    cache: Mutex<VecDeque<(CacheKey, Tensor)>>,
}

impl RotaryEmbedding {
    /// `RotaryEmbedding(kv_channels, rotary_percent, rotary_interleaved,
    /// seq_len_interpolation_factor, rotary_base)`.
    ///
    /// # Panics
    /// Never on validated configs: the rotary dimension is checked to be a positive even number
    /// by [`TransformerConfig`] resolution; other callers get a zero-length table.
    pub fn new(
        kv_channels: i64,
        rotary_percent: f64,
        rotary_interleaved: bool,
        seq_len_interpolation_factor: Option<f64>,
        rotary_base: f64,
    ) -> Self {
        let dim = if rotary_percent < 1.0 {
            (kv_channels as f64 * rotary_percent) as i64
        } else {
            kv_channels
        };
        let exponent = Tensor::arange_start_step(0, dim.max(0), 2, (Kind::Float, Device::Cpu))
            / (dim.max(1) as f64);
        let inv_freq = Tensor::pow_scalar(rotary_base, &exponent).reciprocal();
        Self {
            inv_freq,
            rotary_interleaved,
            seq_len_interpolation_factor,
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// The embedding a config describes.
    pub fn from_config(config: &TransformerConfig) -> Self {
        Self::new(
            config.kv_channels,
            config.rotary_percent,
            config.rotary_interleaved,
            config.seq_len_interpolation_factor,
            config.rotary_base,
        )
    }

    /// Number of rotated channels.
    pub fn dim(&self) -> i64 {
        self.inv_freq.size()[0] * 2
    }

    /// Whether the table is interleaved.
    pub fn interleaved(&self) -> bool {
        self.rotary_interleaved
    }

    /// `forward(max_seq_len, offset)`: the `[max_seq_len, 1, 1, dim]` fp32 table for positions
    /// `offset..offset + max_seq_len`, on `device`. Cached (32 entries, least recently used
    /// dropped first), so a steady-state forward builds nothing.
    pub fn forward(&self, max_seq_len: i64, offset: i64, device: Device) -> Tensor {
        let key = (max_seq_len, offset, device);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = cache.iter().position(|(k, _)| *k == key) {
            let entry = cache.remove(pos).unwrap_or_else(|| unreachable!());
            let t = entry.1.shallow_clone();
            cache.push_front(entry);
            return t;
        }
        let emb = self.build(max_seq_len, offset, device);
        cache.push_front((key, emb.shallow_clone()));
        cache.truncate(CACHE_SIZE);
        emb
    }

    /// `cos` and `sin` of the non-repeated frequencies, `[max_seq_len, dim / 2]` fp32 each
    /// (Megatron's `get_cos_sin`, used by flash decoding).
    pub fn cos_sin(&self, max_seq_len: i64, offset: i64, device: Device) -> (Tensor, Tensor) {
        let freqs = self.freqs(max_seq_len, offset, device);
        (freqs.cos(), freqs.sin())
    }

    fn freqs(&self, max_seq_len: i64, offset: i64, device: Device) -> Tensor {
        let mut seq = Tensor::arange(max_seq_len, (Kind::Float, device)) + offset;
        if let Some(f) = self.seq_len_interpolation_factor {
            seq *= 1.0 / f;
        }
        seq.outer(&self.inv_freq.to_device(device))
    }

    fn build(&self, max_seq_len: i64, offset: i64, device: Device) -> Tensor {
        let freqs = self.freqs(max_seq_len, offset, device);
        let emb = if self.rotary_interleaved {
            let col = freqs.reshape([-1, 1]);
            Tensor::stack(&[&col, &col], -1).reshape([max_seq_len, -1])
        } else {
            Tensor::cat(&[&freqs, &freqs], -1)
        };
        emb.reshape([max_seq_len, 1, 1, -1])
    }
}

fn rotate_half(x: &Tensor, interleaved: bool) -> Result<Tensor, ForwardError> {
    if interleaved {
        let d = x.size().last().copied().unwrap_or(0);
        let x1 = x.f_slice(-1, 0, d, 2)?;
        let x2 = x.f_slice(-1, 1, d, 2)?;
        let stacked = Tensor::f_stack(&[&x2.f_neg()?, &x1], -1)?;
        let mut shape = x.size();
        if let Some(last) = shape.last_mut() {
            *last = -1;
        }
        Ok(stacked.f_reshape(&shape)?)
    } else {
        let halves = x.f_chunk(2, -1)?;
        Ok(Tensor::f_cat(&[&halves[1].f_neg()?, &halves[0]], -1)?)
    }
}

/// Megatron's `_apply_rotary_pos_emb_bshd` with `mscale = 1`: rotates the first
/// `freqs.size(-1)` channels of `t` (`[s, b, heads, hn]`) by `freqs` (`[s, 1, 1, rot_dim]`,
/// broadcast over batch and heads), computing in `t`'s dtype with `cos`/`sin` rounded to it.
pub fn apply_rotary_pos_emb(
    t: &Tensor,
    freqs: &Tensor,
    interleaved: bool,
) -> Result<Tensor, ForwardError> {
    let rot = freqs.size().last().copied().unwrap_or(0);
    let d = t.size().last().copied().unwrap_or(0);
    let t_rot = t.f_narrow(-1, 0, rot)?;
    let cos = freqs.f_cos()?.f_to_kind(t.kind())?;
    let sin = freqs.f_sin()?.f_to_kind(t.kind())?;
    let rotated = t_rot.f_mul(&cos)?.f_add(&rotate_half(&t_rot, interleaved)?.f_mul(&sin)?)?;
    if rot == d {
        Ok(rotated)
    } else {
        Ok(Tensor::f_cat(&[&rotated, &t.f_narrow(-1, rot, d - rot)?], -1)?)
    }
}
