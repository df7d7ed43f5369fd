//! Megatron's `StaticInferenceContext`: one contiguous key/value cache per layer,
//! `[max_sequence_length, max_batch_size, num_query_groups, kv_channels]`, allocated once on the
//! layer's first call and keyed by the global layer number.
//!
//! A step writes its keys and values at rows `sequence_len_offset..+s` and batch columns
//! `batch_size_offset..+b`, and attends with the layer's own core attention over the whole
//! cached prefix. The caller advances `sequence_len_offset` after every layer has run the step
//! ([`StaticInferenceContext::advance`]).
//!
//! Rotary: the cache holds keys *after* rotary (as Megatron's flash-decode and dynamic paths
//! do). Megatron's non-flash static path caches un-rotated keys and rotates the whole prefix
//! again every step; each key gets the same rotation either way, so outputs are identical,
//! and a step costs O(new tokens) of rotary work instead of O(prefix).
//!
//! Chunked prefill (a step with `s > 1` at `sequence_len_offset > 0`) gets a bottom-right
//! aligned causal mask, so a chunk sees the whole cached prefix; Megatron's local core attention
//! refuses that case. A single-token step attends to every cached key.

use std::collections::BTreeMap;

use attention_core::inference::{
    FlashDecode, InferenceContext, LayerContext, Qkv, RotaryCosSin, StaticDecodeStep,
};
use attention_core::{AttentionInput, RotaryPosEmb};
use attention_spec::module::CoreAttentionInput;
use attention_spec::{AttnMaskType, ForwardError};
use tch::{Device, Kind, Tensor};

use crate::error::InferenceError;

/// Megatron's static-batching KV cache.
#[derive(Debug)]
pub struct StaticInferenceContext {
    /// Largest batch the caches hold.
    pub max_batch_size: i64,
    /// Longest sequence the caches hold.
    pub max_sequence_length: i64,
    /// Tokens already cached (first row the next step writes).
    pub sequence_len_offset: i64,
    /// First batch row of the current micro-batch.
    pub batch_size_offset: i64,
    decode_mode: bool,
    key_value_memory: BTreeMap<i64, (Tensor, Tensor)>,
    /// A fused kernel for single-token steps (Megatron's `flash_decode`), if set.
    flash_decode: Option<Box<dyn FlashDecode>>,
    /// int32 `[max_batch]` on the cache's device: `sequence_len_offset` for every row, kept in
    /// place so a captured decode step replays with new offsets.
    offsets: Option<(Tensor, i64)>,
    /// cos/sin of the last rotary table seen, keyed by its address and shape.
    cos_sin: Option<(RotaryKey, Tensor, Tensor)>,
}

/// Identifies a rotary table: its data address, shape, and whether it is interleaved.
type RotaryKey = (usize, Vec<i64>, bool);

impl StaticInferenceContext {
    /// An empty context.
    pub fn new(max_batch_size: i64, max_sequence_length: i64) -> Result<Self, InferenceError> {
        if max_batch_size < 1 || max_sequence_length < 1 {
            return Err(InferenceError::Invalid(format!(
                "max_batch_size ({max_batch_size}) and max_sequence_length \
                 ({max_sequence_length}) must be at least 1"
            )));
        }
        Ok(Self {
            max_batch_size,
            max_sequence_length,
            sequence_len_offset: 0,
            batch_size_offset: 0,
            decode_mode: false,
            key_value_memory: BTreeMap::new(),
            flash_decode: None,
            offsets: None,
            cos_sin: None,
        })
    }

    /// Runs single-token steps through a fused decode kernel (e.g. `attention-cuda`'s
    /// `CudaFlashDecode`): rotary, append and attention in one launch. Steps with more than one
    /// token, a mask or a bias keep the ordinary path; both write the same (rotated) cache.
    pub fn set_flash_decode(&mut self, kernel: Box<dyn FlashDecode>) {
        self.flash_decode = Some(kernel);
    }

    /// The int32 `[max_batch_size]` device tensor the fused decode kernel reads the rows'
    /// offsets from, refilled with `sequence_len_offset` if that moved (or created on `device`).
    ///
    /// A decode step does this itself. Between replays of a captured decode step (a CUDA
    /// graph, which replays the kernels but none of the host code), call it after
    /// [`advance`](Self::advance): the replayed kernels then read the new offset, and rotate,
    /// append and attend at it. The replay does not check limits: the caller keeps
    /// `sequence_len_offset` below `max_sequence_length`.
    pub fn refresh_decode_offsets(&mut self, device: Device) -> Result<&Tensor, ForwardError> {
        let current = self.sequence_len_offset;
        let stale = !matches!(&self.offsets, Some((t, v)) if t.device() == device && *v == current);
        if stale {
            let t = match self.offsets.take() {
                Some((mut t, _)) if t.device() == device => {
                    let _ = t.f_fill_(current)?;
                    t
                }
                _ => Tensor::f_full([self.max_batch_size], current, (Kind::Int, device))?,
            };
            self.offsets = Some((t, current));
        }
        match &self.offsets {
            Some((t, _)) => Ok(t),
            None => unreachable!("set above"),
        }
    }

    /// Whether a fused decode kernel is set.
    pub fn has_flash_decode(&self) -> bool {
        self.flash_decode.is_some()
    }

    /// The cached keys and values of a layer, `[max_seq, max_batch, ngp, hn]` each.
    pub fn key_value_memory(&self, layer_number: i64) -> Option<(&Tensor, &Tensor)> {
        self.key_value_memory.get(&layer_number).map(|(k, v)| (k, v))
    }

    /// Layers with allocated memory.
    pub fn layers(&self) -> impl Iterator<Item = i64> + '_ {
        self.key_value_memory.keys().copied()
    }

    /// Bytes of key/value memory allocated.
    pub fn memory_bytes(&self) -> i64 {
        self.key_value_memory
            .values()
            .map(|(k, v)| {
                (k.numel() * k.kind().elt_size_in_bytes()
                    + v.numel() * v.kind().elt_size_in_bytes()) as i64
            })
            .sum()
    }

    /// Marks the loop as encoding prompts (Megatron `enable_prefill_mode`).
    pub fn enable_prefill_mode(&mut self) {
        self.decode_mode = false;
    }

    /// Marks the loop as generating (Megatron `enable_decode_mode`).
    pub fn enable_decode_mode(&mut self) {
        self.decode_mode = true;
    }

    /// Whether only decode steps run (Megatron `is_decode_only`).
    pub fn is_decode_only(&self) -> bool {
        self.decode_mode
    }

    /// Moves `sequence_len_offset` past a step of `tokens` tokens that every layer has run.
    pub fn advance(&mut self, tokens: i64) -> Result<(), InferenceError> {
        let next = self.sequence_len_offset + tokens;
        if tokens < 0 || next > self.max_sequence_length {
            return Err(InferenceError::SequenceLimit {
                offset: self.sequence_len_offset,
                tokens,
                max: self.max_sequence_length,
            });
        }
        self.sequence_len_offset = next;
        Ok(())
    }

    /// Starts a new batch: offsets to zero, prefill mode. The memory stays allocated.
    pub fn reset(&mut self) {
        self.sequence_len_offset = 0;
        self.batch_size_offset = 0;
        self.enable_prefill_mode();
    }

    /// Reorders the batch rows of every layer's cache: row `i` becomes old row `batch_idx[i]`
    /// (beam search). `batch_idx` has `max_batch_size` entries in `0..max_batch_size`. The
    /// memory is reordered in place.
    pub fn swap_key_value_dict(&mut self, batch_idx: &[i64]) -> Result<(), InferenceError> {
        if self.key_value_memory.is_empty() {
            return Err(InferenceError::Invalid("should not swap when the cache is empty".into()));
        }
        if batch_idx.len() as i64 != self.max_batch_size
            || batch_idx.iter().any(|&i| i < 0 || i >= self.max_batch_size)
        {
            return Err(InferenceError::Invalid(format!(
                "swap_key_value_dict needs {} indices in 0..{}, got {batch_idx:?}",
                self.max_batch_size, self.max_batch_size
            )));
        }
        tch::no_grad(|| {
            for (k, v) in self.key_value_memory.values_mut() {
                let idx = Tensor::from_slice(batch_idx).to_device(k.device());
                let (nk, nv) = (k.index_select(1, &idx), v.index_select(1, &idx));
                k.copy_(&nk);
                v.copy_(&nv);
            }
        });
        Ok(())
    }

    fn memory_for(
        &mut self,
        layer_number: i64,
        key: &Tensor,
    ) -> Result<(Tensor, Tensor), InferenceError> {
        let size = key.size();
        let (ngp, hn) = (size[2], size[3]);
        if let Some((k, v)) = self.key_value_memory.get(&layer_number) {
            let want = [self.max_sequence_length, self.max_batch_size, ngp, hn];
            if k.size() != want || k.kind() != key.kind() || k.device() != key.device() {
                return Err(InferenceError::LayoutMismatch {
                    layer_number,
                    reason: format!(
                        "cache is {:?} {:?} on {:?}, the step needs {want:?} {:?} on {:?}",
                        k.size(),
                        k.kind(),
                        k.device(),
                        key.kind(),
                        key.device()
                    ),
                });
            }
            return Ok((k.shallow_clone(), v.shallow_clone()));
        }
        // Megatron's `_allocate_memory`: once per layer, on its first call.
        let shape = [self.max_sequence_length, self.max_batch_size, ngp, hn];
        let k = Tensor::zeros(shape, (key.kind(), key.device()));
        let v = Tensor::zeros(shape, (key.kind(), key.device()));
        self.key_value_memory.insert(layer_number, (k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}

impl StaticInferenceContext {
    /// A single-token step through the fused kernel.
    fn fused_decode(
        &mut self,
        layer: &LayerContext<'_>,
        (query, key, value): (&Tensor, &Tensor, &Tensor),
        (k_mem, v_mem): (&Tensor, &Tensor),
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor, ForwardError> {
        let device = key.device();
        let b = key.size()[1];
        let b0 = self.batch_size_offset;
        let offsets = self.refresh_decode_offsets(device)?.f_narrow(0, b0, b)?;
        // cos/sin [max_seq, rot/2] of the rotary table (rotate-half: its first half; interleaved:
        // its even columns), cached while the same table comes back.
        let interleaved = layer.config.rotary_interleaved;
        let cos_sin = match rope {
            Some((q_emb, _)) => {
                let key_id = (q_emb.data_ptr() as usize, q_emb.size(), interleaved);
                if self.cos_sin.as_ref().is_none_or(|(k, _, _)| *k != key_id) {
                    let rot = q_emb.size()[3];
                    let flat = q_emb.f_reshape([q_emb.size()[0], rot])?.f_to_kind(Kind::Float)?;
                    let freqs = if interleaved {
                        flat.f_slice(1, 0, rot, 2)?
                    } else {
                        flat.f_narrow(1, 0, rot / 2)?
                    };
                    self.cos_sin = Some((
                        key_id,
                        freqs.f_cos()?.f_contiguous()?,
                        freqs.f_sin()?.f_contiguous()?,
                    ));
                }
                self.cos_sin.as_ref().map(|(_, c, s)| RotaryCosSin { cos: c, sin: s, interleaved })
            }
            None => None,
        };
        let scale =
            layer.config.softmax_scale.unwrap_or(1.0 / (layer.config.kv_channels as f64).sqrt());
        let (query, key, value) =
            (query.f_contiguous()?, key.f_contiguous()?, value.f_contiguous()?);
        let step = StaticDecodeStep {
            query: &query,
            key: &key,
            value: &value,
            key_cache: k_mem,
            value_cache: v_mem,
            batch_offset: self.batch_size_offset,
            sequence_offsets: &offsets,
            max_sequence_offset: Some(self.sequence_len_offset),
            rotary: cos_sin,
            softmax_scale: scale,
        };
        match &self.flash_decode {
            Some(kernel) => kernel.flash_decode(&step),
            None => unreachable!("checked by the caller"),
        }
    }
}

/// `[1, 1, s, s0 + s]`, true where key `j` lies after query `i` (at absolute position `s0 + i`).
fn bottom_right_causal(s: i64, s0: i64, device: Device) -> Tensor {
    let q = Tensor::arange_start(s0, s0 + s, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(s0 + s, (Kind::Int64, device)).unsqueeze(0);
    k.gt_tensor(&q).reshape([1, 1, s, s0 + s])
}

impl InferenceContext for StaticInferenceContext {
    fn attend(
        &mut self,
        layer: &LayerContext<'_>,
        qkv: Qkv,
        input: &AttentionInput<'_>,
    ) -> Result<Tensor, ForwardError> {
        let Qkv { query, key, value } = qkv;
        let (s, b) = (key.size()[0], key.size()[1]);
        let (s0, b0) = (self.sequence_len_offset, self.batch_size_offset);
        let (s1, b1) = (s0 + s, b0 + b);
        // 1. Limits, before anything is written.
        if b0 < 0 || b1 > self.max_batch_size {
            return Err(InferenceError::BatchLimit {
                offset: b0,
                batch: b,
                max: self.max_batch_size,
            }
            .into());
        }
        if s0 < 0 || s1 > self.max_sequence_length {
            return Err(InferenceError::SequenceLimit {
                offset: s0,
                tokens: s,
                max: self.max_sequence_length,
            }
            .into());
        }
        let rope = input.rotary_pos_emb.map(RotaryPosEmb::pair);
        if let Some((q_emb, k_emb)) = rope {
            let rows = q_emb.size()[0].min(k_emb.size()[0]);
            if rows < s1 {
                return Err(InferenceError::RotaryTooShort { rows, needed: s1 }.into());
            }
        }
        let np = query.size()[2];
        if let Some(mask) = input.attention_mask {
            attention_core::mask::check_mask(mask, b, np, s, s1, key.device())?;
        }
        if let Some(bias) = input.attention_bias {
            attention_core::mask::check_bias(bias, b, np, s, s1, key.device())?;
        }
        let (k_mem, v_mem) = self.memory_for(layer.layer_number, &key)?;
        if s == 1
            && self.flash_decode.is_some()
            && input.attention_mask.is_none()
            && input.attention_bias.is_none()
        {
            return self.fused_decode(layer, (&query, &key, &value), (&k_mem, &v_mem), rope);
        }
        // 2. Rotate the new tokens at positions s0..s1; cache rotated keys.
        let interleaved = layer.config.rotary_interleaved;
        let (query, key) = match rope {
            Some((q_emb, k_emb)) => (
                attention_core::rotary::apply_rotary_pos_emb(
                    &query,
                    &q_emb.f_narrow(0, s0, s)?,
                    interleaved,
                )?,
                attention_core::rotary::apply_rotary_pos_emb(
                    &key,
                    &k_emb.f_narrow(0, s0, s)?,
                    interleaved,
                )?,
            ),
            None => (query, key),
        };
        tch::no_grad(|| -> Result<(), ForwardError> {
            k_mem.f_narrow(0, s0, s)?.f_narrow(1, b0, b)?.f_copy_(&key)?;
            v_mem.f_narrow(0, s0, s)?.f_narrow(1, b0, b)?.f_copy_(&value)?;
            Ok(())
        })?;
        // 3. Attend over the whole prefix with the layer's core attention.
        let k_all = k_mem.f_narrow(0, 0, s1)?.f_narrow(1, b0, b)?;
        let v_all = v_mem.f_narrow(0, 0, s1)?.f_narrow(1, b0, b)?;
        let chunk_mask = (input.attention_mask.is_none()
            && s0 > 0
            && s > 1
            && layer.attn_mask_type == AttnMaskType::Causal)
            .then(|| bottom_right_causal(s, s0, query.device()));
        let mask = input.attention_mask.or(chunk_mask.as_ref());
        layer.core_attention.forward(&CoreAttentionInput {
            query: &query,
            key: &k_all,
            value: &v_all,
            attention_mask: mask,
            attn_mask_type: if s0 > 0 { AttnMaskType::NoMask } else { layer.attn_mask_type },
            attention_bias: input.attention_bias,
            packed_seq_params: None,
            training: input.training,
        })
    }
}
