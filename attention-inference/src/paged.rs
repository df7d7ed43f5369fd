//! `paged-attention`: the CPU reference of `flash_decode_and_prefill`, a core-attention kind
//! that runs inside [`DynamicInferenceContext`](crate::DynamicInferenceContext).
//!
//! For one step it appends the new tokens' keys and values into their blocks (at
//! `slot_mapping`), then, request by request, gathers the request's blocks from the block
//! table, takes the first `seqlens_k[i]` cached tokens, and attends its `lq` new queries with a
//! bottom-right aligned causal mask (query `j` sits at position `lk - lq + j` and sees keys
//! `0..=lk - lq + j`), in fp32, GQA by repeating key/value heads. It is written to be obviously
//! right, not fast: it reads the metadata on the host and loops over requests. It is the oracle
//! the CUDA kernels are tested against.
//!
//! Scale: `softmax_scale` or `1/sqrt(kv_channels)`. (Megatron's dynamic path ignores
//! `config.softmax_scale`; that is a bug this crate does not copy.)

use attention_spec::module::{CoreAttention, CoreAttentionInput, PagedKv};
use attention_spec::registry::{Builder, CoreAttentionArgs, ModuleFactory, NoParams};
use attention_spec::{ForwardError, SpecError};
use tch::{Device, Kind, Tensor};

/// The reference paged attention.
#[derive(Debug)]
pub struct PagedAttention {
    scale: f64,
}

impl PagedAttention {
    /// Builds the kind from its slot arguments.
    pub fn new(args: &CoreAttentionArgs<'_>) -> Result<Self, SpecError> {
        let _: NoParams = args.params.decode("paged-attention")?;
        Ok(Self {
            scale: args
                .config
                .softmax_scale
                .unwrap_or(1.0 / (args.config.kv_channels as f64).sqrt()),
        })
    }
}

fn host(name: &'static str, t: &Tensor) -> Result<Vec<i64>, ForwardError> {
    if !matches!(t.kind(), Kind::Int | Kind::Int64) {
        return Err(ForwardError::Dtype { name, expected: "int32 or int64".into(), got: t.kind() });
    }
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?;
    Ok(Vec::<i64>::try_from(&flat)?)
}

fn shape(name: &'static str, t: &Tensor, want: &[i64], expected: &str) -> Result<(), ForwardError> {
    let size = t.size();
    let ok = size.len() == want.len() && size.iter().zip(want).all(|(&s, &w)| w < 0 || s == w);
    if ok {
        Ok(())
    } else {
        Err(ForwardError::Shape { name, expected: expected.into(), got: size })
    }
}

/// Validates a paged step; returns `(T, np, ngp, hn, num_blocks, block_size)`.
fn check(input: &CoreAttentionInput<'_>, paged: &PagedKv<'_>) -> Result<[i64; 6], ForwardError> {
    let q = input.query.size();
    let &[t, 1, np, hn] = q.as_slice() else {
        return Err(ForwardError::Shape {
            name: "query",
            expected: "[T, 1, np, hn]".into(),
            got: q,
        });
    };
    let kc = paged.key_cache.size();
    let &[nb, bs, ngp, _] = kc.as_slice() else {
        return Err(ForwardError::Shape {
            name: "key_cache",
            expected: "[num_blocks, block_size, ngp, hn]".into(),
            got: kc,
        });
    };
    shape(
        "key_cache",
        paged.key_cache,
        &[nb, bs, ngp, hn],
        "[num_blocks, block_size, ngp, hn = query's hn]",
    )?;
    shape("value_cache", paged.value_cache, &[nb, bs, ngp, hn], "the key cache's shape")?;
    shape("key", input.key, &[t, 1, ngp, hn], "[T, 1, ngp, hn]")?;
    shape("value", input.value, &[t, 1, ngp, hn], "[T, 1, ngp, hn]")?;
    shape("slot_mapping", paged.slot_mapping, &[t], "[T]")?;
    shape("block_table", paged.block_table, &[-1, -1], "[n, max_blocks]")?;
    let n = paged.block_table.size()[0];
    shape("cu_seqlens_q", paged.cu_seqlens_q, &[n + 1], "[n + 1]")?;
    shape("seqlens_k", paged.seqlens_k, &[n], "[n]")?;
    if ngp == 0 || np % ngp != 0 {
        return Err(ForwardError::Invalid {
            name: "key_cache",
            reason: format!("{np} query heads, {ngp} key/value heads"),
        });
    }
    for (name, c) in [
        ("key_cache", paged.key_cache),
        ("value_cache", paged.value_cache),
        ("key", input.key),
        ("value", input.value),
    ] {
        if c.kind() != input.query.kind() {
            return Err(ForwardError::Dtype {
                name,
                expected: format!("{:?}", input.query.kind()),
                got: c.kind(),
            });
        }
        if c.device() != input.query.device() {
            return Err(ForwardError::Device {
                name,
                expected: input.query.device(),
                got: c.device(),
            });
        }
    }
    if paged.slot_mapping.kind() != Kind::Int64 {
        return Err(ForwardError::Dtype {
            name: "slot_mapping",
            expected: "int64".into(),
            got: paged.slot_mapping.kind(),
        });
    }
    Ok([t, np, ngp, hn, nb, bs])
}

impl CoreAttention for PagedAttention {
    fn kind(&self) -> &'static str {
        "paged-attention"
    }

    fn forward(&self, _input: &CoreAttentionInput<'_>) -> Result<Tensor, ForwardError> {
        Err(ForwardError::Unsupported {
            module: "paged-attention",
            what: "a call without paged KV memory (it runs inside a DynamicInferenceContext)"
                .into(),
        })
    }

    fn forward_paged(
        &self,
        input: &CoreAttentionInput<'_>,
        paged: &PagedKv<'_>,
    ) -> Result<Tensor, ForwardError> {
        let [t, np, ngp, hn, nb, bs] = check(input, paged)?;
        let cu_q = host("cu_seqlens_q", paged.cu_seqlens_q)?;
        let lens_k = host("seqlens_k", paged.seqlens_k)?;
        let table = host("block_table", paged.block_table)?;
        let max_blocks = paged.block_table.size()[1];
        if cu_q.first() != Some(&0)
            || cu_q.last() != Some(&t)
            || cu_q.windows(2).any(|w| w[1] < w[0])
        {
            return Err(ForwardError::Invalid {
                name: "cu_seqlens_q",
                reason: format!("{cu_q:?} is not a cumulative split of {t} tokens"),
            });
        }
        // Every request's lengths, before anything is written.
        let tail_from = match paged.prompt_tail {
            None => lens_k.len(),
            Some(tail) => usize::try_from(tail.request)
                .ok()
                .filter(|&r| r <= lens_k.len() && cu_q[r] == tail.token)
                .ok_or_else(|| ForwardError::Invalid {
                    name: "prompt_tail",
                    reason: format!(
                        "request {} at token {} in a step of {} requests split at {cu_q:?}",
                        tail.request,
                        tail.token,
                        lens_k.len()
                    ),
                })?,
        };
        if let Some(c) = paged.continued_chunk {
            let fits = usize::try_from(c.request).ok().filter(|&r| {
                r + 1 == tail_from
                    && cu_q[r] == c.token
                    && cu_q[r + 1] - cu_q[r] == c.tokens
                    && lens_k[r] == c.cached + c.tokens
                    && c.cached >= 1
            });
            if fits.is_none() {
                return Err(ForwardError::Invalid {
                    name: "continued_chunk",
                    reason: format!(
                        "{c:?} is not the last request before the prompt tail (request \
                         {tail_from}) with cached keys, in a step split at {cu_q:?} with keys \
                         {lens_k:?}"
                    ),
                });
            }
        }
        for (i, &lk) in lens_k.iter().enumerate() {
            let lq = cu_q[i + 1] - cu_q[i];
            if lk < lq || (lk + bs - 1) / bs > max_blocks {
                return Err(ForwardError::Invalid {
                    name: "seqlens_k",
                    reason: format!(
                        "request {i}: {lk} keys for {lq} queries with {max_blocks} blocks of {bs}"
                    ),
                });
            }
            if i >= tail_from && lk != lq {
                return Err(ForwardError::Invalid {
                    name: "prompt_tail",
                    reason: format!("request {i} of the tail has {} cached keys", lk - lq),
                });
            }
        }
        // 1. Append the new keys and values into their slots.
        tch::no_grad(|| -> Result<(), ForwardError> {
            let mut kf = paged.key_cache.f_view([nb * bs, ngp, hn])?;
            let mut vf = paged.value_cache.f_view([nb * bs, ngp, hn])?;
            let _ = kf.f_index_copy_(0, paged.slot_mapping, &input.key.f_view([t, ngp, hn])?)?;
            let _ = vf.f_index_copy_(0, paged.slot_mapping, &input.value.f_view([t, ngp, hn])?)?;
            Ok(())
        })?;
        // 2. Each request: gather its blocks, attend bottom-right causally.
        let device = input.query.device();
        let mut outs = Vec::with_capacity(lens_k.len());
        for (i, &lk) in lens_k.iter().enumerate() {
            let (q0, lq) = (cu_q[i], cu_q[i + 1] - cu_q[i]);
            let nblk = (lk + bs - 1) / bs;
            if lq == 0 {
                continue;
            }
            let row = &table[(i as i64 * max_blocks) as usize..][..nblk as usize];
            let ids = Tensor::from_slice(row).to_device(device);
            let gather = |cache: &Tensor| -> Result<Tensor, ForwardError> {
                Ok(cache
                    .f_index_select(0, &ids)?
                    .f_reshape([nblk * bs, ngp, hn])?
                    .f_narrow(0, 0, lk)?)
            };
            let (k, v) = (gather(paged.key_cache)?, gather(paged.value_cache)?);
            let rep = np / ngp;
            let k = k
                .f_repeat_interleave_self_int(rep, 1, None)?
                .f_to_kind(Kind::Float)?
                .f_permute([1, 2, 0])?; // [np, hn, lk]
            let v = v
                .f_repeat_interleave_self_int(rep, 1, None)?
                .f_to_kind(Kind::Float)?
                .f_permute([1, 0, 2])?; // [np, lk, hn]
            let q = input
                .query
                .f_narrow(0, q0, lq)?
                .f_reshape([lq, np, hn])?
                .f_to_kind(Kind::Float)?
                .f_permute([1, 0, 2])?;
            let scores = q.f_matmul(&k)?.f_mul_scalar(self.scale)?; // [np, lq, lk]
            let qpos =
                Tensor::f_arange_start(lk - lq, lk, (Kind::Int64, device))?.f_unsqueeze(1)?;
            let kpos = Tensor::f_arange(lk, (Kind::Int64, device))?.f_unsqueeze(0)?;
            let future = kpos.f_gt_tensor(&qpos)?;
            let probs =
                scores.f_masked_fill(&future, f64::NEG_INFINITY)?.f_softmax(-1, Kind::Float)?;
            let o = probs.f_matmul(&v)?.f_permute([1, 0, 2])?.f_reshape([lq, np * hn])?;
            outs.push(o.f_to_kind(input.query.kind())?);
        }
        if outs.is_empty() {
            return Ok(Tensor::f_zeros([0, 1, np * hn], (input.query.kind(), device))?);
        }
        Ok(Tensor::f_cat(&outs, 0)?.f_view([t, 1, np * hn])?)
    }
}

fn build(args: &CoreAttentionArgs<'_>) -> Result<Box<dyn CoreAttention>, SpecError> {
    Ok(Box::new(PagedAttention::new(args)?))
}

inventory::submit! {
    ModuleFactory {
        kind: "paged-attention",
        aliases: &[],
        summary: "reference flash_decode_and_prefill: varlen queries over a paged KV block table",
        registered_in: module_path!(),
        builder: Builder::CoreAttention(build),
    }
}

#[cfg(test)]
mod tests {
    use attention_spec::AttnMaskType;
    use attention_spec::module::{ContinuedChunk, PromptTail};

    use super::*;

    /// Lengths that contradict the step (fewer keys than queries in the second request, cached
    /// keys in the prompt tail, a tail that does not start at its request's first token, a
    /// continued chunk that is not the request before the tail or whose lengths differ) are
    /// refused before the append: the caches are unchanged. True ones run.
    #[test]
    fn contradicting_lengths_leave_the_cache_unchanged() -> Result<(), ForwardError> {
        let (nb, bs, ngp, np, hn) = (4, 4, 1, 2, 8);
        let f = (Kind::Float, Device::Cpu);
        let (kc, vc) = (Tensor::randn([nb, bs, ngp, hn], f), Tensor::randn([nb, bs, ngp, hn], f));
        let (k0, v0) = (kc.copy(), vc.copy());
        // Two requests of two new tokens, on blocks [0, 1] and [2, 3].
        let q = Tensor::randn([4, 1, np, hn], f);
        let (k, v) = (Tensor::randn([4, 1, ngp, hn], f), Tensor::randn([4, 1, ngp, hn], f));
        let input = CoreAttentionInput::new(&q, &k, &v, AttnMaskType::Causal);
        let slots = Tensor::from_slice(&[0i64, 1, 8, 9]);
        let table = Tensor::from_slice(&[0i32, 1, 2, 3]).view([2, 2]);
        let cu = Tensor::from_slice(&[0i32, 2, 4]);
        let step = |lens: [i32; 2], (prompt_tail, continued_chunk)| {
            let lens = Tensor::from_slice(&lens);
            let paged = PagedKv {
                key_cache: &kc,
                value_cache: &vc,
                slot_mapping: &slots,
                block_table: &table,
                cu_seqlens_q: &cu,
                seqlens_k: &lens,
                max_seqlen_q: 2,
                max_seqlen_k: 5,
                prompt_tail,
                continued_chunk,
            };
            PagedAttention { scale: 0.5 }.forward_paged(&input, &paged)
        };
        let second = |token| Some(PromptTail { request: 1, token, ..PromptTail::ALL });
        let chunk = |request, token, cached| {
            let c = ContinuedChunk {
                request,
                token,
                tokens: 2,
                cached,
                before_max_seqlen_q: 2,
                before_max_seqlen_k: 5,
            };
            Some(c)
        };
        for (lens, promise, field) in [
            ([5, 1], (None, None), "seqlens_k"),
            ([5, 2], (Some(PromptTail::ALL), None), "prompt_tail"),
            ([5, 2], (second(1), None), "prompt_tail"),
            ([2, 5], (second(2), None), "prompt_tail"),
            ([5, 2], (second(2), chunk(0, 0, 2)), "continued_chunk"),
            ([5, 5], (None, chunk(0, 0, 3)), "continued_chunk"),
            ([2, 5], (None, chunk(1, 1, 3)), "continued_chunk"),
            ([2, 2], (None, chunk(1, 2, 0)), "continued_chunk"),
        ] {
            match step(lens, promise) {
                Err(ForwardError::Invalid { name, .. }) if name == field => {}
                other => panic!("lengths {lens:?}, tail {promise:?}: {other:?}"),
            }
            assert!(kc.equal(&k0) && vc.equal(&v0), "a refused step wrote the cache");
        }
        for (lens, promise) in [
            ([2, 2], (Some(PromptTail::ALL), None)),
            ([5, 2], (second(2), None)),
            ([5, 2], (second(2), chunk(0, 0, 3))),
            ([2, 5], (None, chunk(1, 2, 3))),
        ] {
            assert_eq!(step(lens, promise)?.size(), [4, 1, np * hn]);
        }
        Ok(())
    }
}
