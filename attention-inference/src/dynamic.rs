//! Megatron's `DynamicInferenceContext`: paged key/value memory shared by many requests, and
//! token-flattened steps that mix decode tokens and (chunked) prefill tokens.
//!
//! Memory is one tensor `[2, num_layers, num_blocks, block_size, kv_heads, kv_channels]`
//! (keys, then values), allocated once from a block count or a byte budget. Requests own whole
//! blocks, handed out by a [`BlockAllocator`]; a request's keys live in its blocks in order.
//! Keys are cached *after* rotary.
//!
//! A generation loop:
//!
//! 1. [`add_request`](DynamicInferenceContext::add_request) with the prompt length;
//! 2. [`schedule`](DynamicInferenceContext::schedule) a step under a token budget: every
//!    request whose prompt is cached contributes one decode token (oldest first), then prompts
//!    are prefilled in arrival order in chunks that fit the remaining budget and the free
//!    blocks. The step's tokens are laid out decode first, then prefill, each request's tokens
//!    contiguous; the plan says which token of which request sits where;
//! 3. run every layer on the step's hidden states `[T, 1, h]` with this context
//!    (`SelfAttention::forward_with_context`): each layer rotates queries and keys at their
//!    positions in their requests, appends keys and values into the blocks, and attends with a
//!    bottom-right aligned causal mask, so a chunk or a decode token sees its whole cached
//!    prefix;
//! 4. [`commit_step`](DynamicInferenceContext::commit_step) (or
//!    [`abort_step`](DynamicInferenceContext::abort_step) after a failure: the step's blocks
//!    return to the pool and no request advances);
//! 5. [`finish_request`](DynamicInferenceContext::finish_request) releases a request's blocks.
//!
//! Out of blocks: a prefill chunk shrinks to the free space and waits when there is none; a
//! decode token that needs a block when none is free makes `schedule` fail with
//! [`InferenceError::OutOfBlocks`], as does a step in which no pending request can make
//! progress. Nothing changes on failure: the caller finishes (evicts) a request and schedules
//! again.

use std::collections::BTreeMap;

use attention_core::inference::{InferenceContext, LayerContext, Qkv};
use attention_core::rotary::apply_rotary_pos_emb;
use attention_core::{AttentionInput, RotaryPosEmb};
use attention_spec::module::{
    AttentionType, ContinuedChunk, CoreAttention, CoreAttentionInput, PagedKv, PromptTail,
};
use attention_spec::registry::{Builder, CoreAttentionArgs, Params};
use attention_spec::{AttnMaskType, ForwardError, Registry, Role, SpecError, TransformerConfig};
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::allocator::BlockAllocator;
use crate::error::{InferenceError, RequestId};

/// How much key/value memory a dynamic context allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMemory {
    /// This many blocks.
    Blocks(i64),
    /// As many blocks as fit in this many bytes.
    Bytes(i64),
}

/// Settings of a [`DynamicInferenceContext`].
#[derive(Debug, Clone)]
pub struct DynamicContextOptions {
    /// Tokens per block (any size >= 1).
    pub block_size: i64,
    /// Memory size.
    pub memory: KvMemory,
    /// Attention layers this context holds memory for.
    pub num_layers: i64,
    /// Global layer number of the first held layer, minus one (Megatron's pipeline-parallel
    /// layer offset, `_get_pp_layer_offset_for_inference`): layer `n` uses memory slot
    /// `n - pp_layer_offset - 1`.
    pub pp_layer_offset: i64,
    /// The registered core-attention kind that runs the paged attention.
    pub paged_attention: String,
    /// Its `params` table (as a spec's `params = { ... }`), e.g. `kernel = "tensor-cores"` for
    /// `paged-attention-cuda`; empty by default.
    pub paged_attention_params: toml::Table,
}

impl DynamicContextOptions {
    /// `num_layers` layers from layer 1, `block_size` tokens per block, `memory`, with the
    /// reference `paged-attention` kernel.
    pub fn new(num_layers: i64, block_size: i64, memory: KvMemory) -> Self {
        Self {
            block_size,
            memory,
            num_layers,
            pp_layer_offset: 0,
            paged_attention: "paged-attention".into(),
            paged_attention_params: toml::Table::new(),
        }
    }
}

/// One request's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepEntry {
    /// The request.
    pub id: RequestId,
    /// Position (within the request) of the entry's first token.
    pub start: i64,
    /// Number of tokens.
    pub tokens: i64,
    /// A decode token (the prompt was already cached) rather than prompt tokens.
    pub decode: bool,
}

/// What a scheduled step holds, in token order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepPlan {
    /// Entries: decode tokens first, then prefill chunks.
    pub entries: Vec<StepEntry>,
}

impl StepPlan {
    /// Tokens in the step.
    pub fn total_tokens(&self) -> i64 {
        self.entries.iter().map(|e| e.tokens).sum()
    }

    /// Whether the step holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Per-step metadata, built once per step and shared by every layer (Megatron's
/// `MHAMetadata`): int32 lengths and block table, int64 positions and slots, on the
/// context's device.
#[derive(Debug)]
pub struct StepMetadata {
    /// `[n]` new tokens per request.
    pub query_lengths: Tensor,
    /// `[n + 1]`.
    pub cu_seqlens_q: Tensor,
    /// `[n]` cached + new tokens per request.
    pub kv_seq_lengths: Tensor,
    /// `[n + 1]`.
    pub cu_seqlens_k: Tensor,
    /// `[n, max_blocks]`, padded with -1.
    pub block_table: Tensor,
    /// `[T]` position of each token within its request (rotary).
    pub token_positions: Tensor,
    /// `[T]` flat slot `block * block_size + offset` each token's key and value go to.
    pub slot_mapping: Tensor,
    /// Longest query run.
    pub max_seqlen_q: i64,
    /// Longest key run.
    pub max_seqlen_k: i64,
    /// The step's trailing requests without cached keys (prompts' first chunks), if any.
    pub prompt_tail: Option<PromptTail>,
    /// The prompt chunk over cached keys just before them (or ending the step), if any.
    pub continued_chunk: Option<ContinuedChunk>,
}

/// The entries after the last one with cached keys, with the bounds of those before.
fn prompt_tail(plan: &StepPlan, q_lens: &[i32], k_lens: &[i32]) -> Option<PromptTail> {
    let first = plan.entries.iter().rposition(|e| e.start > 0).map_or(0, |i| i + 1);
    let longest = |v: &[i32]| v.iter().copied().max().unwrap_or(0) as i64;
    (first < plan.entries.len()).then(|| PromptTail {
        request: first as i64,
        token: q_lens[..first].iter().map(|&l| l as i64).sum(),
        head_max_seqlen_q: longest(&q_lens[..first]),
        head_max_seqlen_k: longest(&k_lens[..first]),
    })
}

/// The last entry with cached keys when it is a prompt's chunk rather than a decode token,
/// with the bounds of the entries before it.
fn continued_chunk(plan: &StepPlan, q_lens: &[i32], k_lens: &[i32]) -> Option<ContinuedChunk> {
    let i = plan.entries.iter().rposition(|e| e.start > 0)?;
    let e = &plan.entries[i];
    let longest = |v: &[i32]| v.iter().copied().max().unwrap_or(0) as i64;
    (!e.decode).then(|| ContinuedChunk {
        request: i as i64,
        token: q_lens[..i].iter().map(|&l| l as i64).sum(),
        tokens: e.tokens,
        cached: e.start,
        before_max_seqlen_q: longest(&q_lens[..i]),
        before_max_seqlen_k: longest(&k_lens[..i]),
    })
}

#[derive(Debug, Clone)]
struct Request {
    prompt_len: i64,
    /// Tokens whose keys and values are cached.
    cached: i64,
    blocks: Vec<i64>,
}

#[derive(Debug)]
struct Step {
    plan: StepPlan,
    /// Blocks the step added, per request, for `abort_step`.
    new_blocks: Vec<(RequestId, Vec<i64>)>,
    meta: StepMetadata,
}

/// The paged KV-cache context.
#[derive(Debug)]
pub struct DynamicInferenceContext {
    block_size: i64,
    num_layers: i64,
    pp_layer_offset: i64,
    kv_heads: i64,
    head_dim: i64,
    memory: Tensor,
    allocator: BlockAllocator,
    requests: BTreeMap<RequestId, Request>,
    /// Arrival order.
    order: Vec<RequestId>,
    step: Option<Step>,
    paged: Box<dyn CoreAttention>,
}

fn blocks_for(tokens: i64, block_size: i64) -> i64 {
    (tokens + block_size - 1) / block_size
}

impl DynamicInferenceContext {
    /// Allocates the memory for a model described by `config`, in `kind` on `device`, and
    /// builds the paged attention kind from `registry`.
    pub fn new(
        config: &TransformerConfig,
        options: &DynamicContextOptions,
        kind: Kind,
        device: Device,
        registry: &Registry,
    ) -> Result<Self, SpecError> {
        let invalid = |field: &'static str, value: i64, reason: &str| SpecError::InvalidValue {
            place: attention_spec::Place::root().key("dynamic_context"),
            field,
            value: value.to_string(),
            reason: reason.into(),
        };
        if options.block_size < 1 {
            return Err(invalid("block_size", options.block_size, "must be at least 1"));
        }
        if options.num_layers < 1 {
            return Err(invalid("num_layers", options.num_layers, "must be at least 1"));
        }
        let kv_heads = config.num_query_groups_per_partition();
        let head_dim = config.kv_channels;
        let block_bytes = 2
            * options.num_layers
            * options.block_size
            * kv_heads
            * head_dim
            * kind.elt_size_in_bytes() as i64;
        let num_blocks = match options.memory {
            KvMemory::Blocks(n) => n,
            KvMemory::Bytes(b) => b / block_bytes,
        };
        if num_blocks < 1 {
            return Err(invalid("memory", num_blocks, "holds less than one block"));
        }
        let place = attention_spec::Place::root().key("paged_attention");
        let factory = registry.lookup(&options.paged_attention, &place)?;
        let Builder::CoreAttention(build) = factory.builder else {
            return Err(SpecError::WrongRole {
                place,
                slot: "paged_attention".into(),
                kind: options.paged_attention.clone(),
                expected: Role::CoreAttention,
                got: factory.role(),
            });
        };
        let vs = VarStore::new(device);
        let paged = build(&CoreAttentionArgs {
            path: &vs.root(),
            config,
            params: &Params { table: options.paged_attention_params.clone(), place: place.clone() },
            layer_number: options.pp_layer_offset + 1,
            attn_mask_type: AttnMaskType::Causal,
            attention_type: AttentionType::SelfAttention,
        })?;
        let memory = Tensor::f_zeros(
            [2, options.num_layers, num_blocks, options.block_size, kv_heads, head_dim],
            (kind, device),
        )?;
        Ok(Self {
            block_size: options.block_size,
            num_layers: options.num_layers,
            pp_layer_offset: options.pp_layer_offset,
            kv_heads,
            head_dim,
            memory,
            allocator: BlockAllocator::new(num_blocks),
            requests: BTreeMap::new(),
            order: Vec::new(),
            step: None,
            paged,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> i64 {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> i64 {
        self.allocator.total()
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> i64 {
        self.allocator.free()
    }

    /// Blocks owned by requests.
    pub fn used_blocks(&self) -> i64 {
        self.allocator.used()
    }

    /// Bytes of key/value memory.
    pub fn memory_bytes(&self) -> i64 {
        (self.memory.numel() * self.memory.kind().elt_size_in_bytes()) as i64
    }

    /// The whole memory, `[2, num_layers, num_blocks, block_size, kv_heads, kv_channels]`.
    pub fn memory(&self) -> &Tensor {
        &self.memory
    }

    /// Live requests, in arrival order.
    pub fn request_ids(&self) -> &[RequestId] {
        &self.order
    }

    /// `(prompt_len, cached tokens, blocks)` of a request.
    pub fn request(&self, id: RequestId) -> Option<(i64, i64, &[i64])> {
        self.requests.get(&id).map(|r| (r.prompt_len, r.cached, r.blocks.as_slice()))
    }

    /// The scheduled step, if any.
    pub fn step_plan(&self) -> Option<&StepPlan> {
        self.step.as_ref().map(|s| &s.plan)
    }

    /// The scheduled step's metadata, if any.
    pub fn step_metadata(&self) -> Option<&StepMetadata> {
        self.step.as_ref().map(|s| &s.meta)
    }

    /// Adds a request with a prompt of `prompt_len` tokens.
    pub fn add_request(&mut self, id: RequestId, prompt_len: i64) -> Result<(), InferenceError> {
        if self.requests.contains_key(&id) {
            return Err(InferenceError::DuplicateRequest(id));
        }
        if prompt_len < 1 {
            return Err(InferenceError::Invalid(format!(
                "request {id}: prompt_len must be at least 1, got {prompt_len}"
            )));
        }
        let capacity = self.allocator.total() * self.block_size;
        if prompt_len > capacity {
            return Err(InferenceError::RequestTooLong { id, tokens: prompt_len, capacity });
        }
        self.requests.insert(id, Request { prompt_len, cached: 0, blocks: Vec::new() });
        self.order.push(id);
        Ok(())
    }

    /// Releases a finished request's blocks.
    pub fn finish_request(&mut self, id: RequestId) -> Result<(), InferenceError> {
        if !self.requests.contains_key(&id) {
            return Err(InferenceError::UnknownRequest(id));
        }
        if self.step.is_some() {
            return Err(InferenceError::StepInProgress);
        }
        if let Some(r) = self.requests.remove(&id) {
            self.allocator.release(&r.blocks);
        }
        self.order.retain(|&o| o != id);
        Ok(())
    }

    /// Plans the next step under `token_budget` tokens, allocates its blocks and builds its
    /// metadata. An empty plan (no requests, or a zero budget) schedules no step. See the
    /// module docs for the policy when blocks run out.
    pub fn schedule(&mut self, token_budget: i64) -> Result<StepPlan, InferenceError> {
        if self.step.is_some() {
            return Err(InferenceError::StepInProgress);
        }
        let bs = self.block_size;
        let mut free = self.allocator.free();
        let mut budget = token_budget.max(0);
        let mut entries = Vec::new();
        let mut need: Vec<(RequestId, i64)> = Vec::new();
        // 1. Decode tokens, oldest request first; each may need a fresh block.
        let mut decode_blocks = 0;
        for &id in &self.order {
            let r = &self.requests[&id];
            if r.cached < r.prompt_len || budget == 0 {
                continue;
            }
            let n = blocks_for(r.cached + 1, bs) - r.blocks.len() as i64;
            decode_blocks += n;
            entries.push(StepEntry { id, start: r.cached, tokens: 1, decode: true });
            need.push((id, n));
            budget -= 1;
        }
        if decode_blocks > free {
            return Err(InferenceError::OutOfBlocks {
                needed: decode_blocks,
                free,
                total: self.allocator.total(),
            });
        }
        free -= decode_blocks;
        // 2. Prefill chunks in arrival order, shrunk to the budget and the free space.
        let mut waiting = false;
        for &id in &self.order {
            let r = &self.requests[&id];
            if r.cached >= r.prompt_len {
                continue;
            }
            let room = r.blocks.len() as i64 * bs - r.cached + free * bs;
            let chunk = (r.prompt_len - r.cached).min(budget).min(room);
            if chunk <= 0 {
                waiting |= budget > 0;
                continue;
            }
            let n = blocks_for(r.cached + chunk, bs) - r.blocks.len() as i64;
            free -= n;
            budget -= chunk;
            entries.push(StepEntry { id, start: r.cached, tokens: chunk, decode: false });
            need.push((id, n));
        }
        if entries.is_empty() {
            if waiting {
                return Err(InferenceError::OutOfBlocks {
                    needed: 1,
                    free: self.allocator.free(),
                    total: self.allocator.total(),
                });
            }
            return Ok(StepPlan::default());
        }
        // 3. Allocate (cannot fail: the plan fits `free`), then build the metadata.
        let total: i64 = need.iter().map(|(_, n)| n).sum();
        let mut fresh = self.allocator.allocate(total)?;
        let mut new_blocks = Vec::new();
        for (id, n) in need {
            let taken: Vec<i64> = fresh.drain(..n as usize).collect();
            if let Some(r) = self.requests.get_mut(&id) {
                r.blocks.extend_from_slice(&taken);
            }
            new_blocks.push((id, taken));
        }
        let plan = StepPlan { entries };
        let meta = self.metadata(&plan);
        self.step = Some(Step { plan: plan.clone(), new_blocks, meta });
        Ok(plan)
    }

    fn metadata(&self, plan: &StepPlan) -> StepMetadata {
        let bs = self.block_size;
        let device = self.memory.device();
        let n = plan.entries.len();
        let mut q_lens = Vec::with_capacity(n);
        let mut k_lens = Vec::with_capacity(n);
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let max_blocks = plan
            .entries
            .iter()
            .map(|e| self.requests[&e.id].blocks.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut table = vec![-1i32; n * max_blocks];
        for (i, e) in plan.entries.iter().enumerate() {
            let r = &self.requests[&e.id];
            q_lens.push(e.tokens as i32);
            k_lens.push((e.start + e.tokens) as i32);
            for (j, b) in r.blocks.iter().enumerate() {
                table[i * max_blocks + j] = *b as i32;
            }
            for p in e.start..e.start + e.tokens {
                positions.push(p);
                slots.push(r.blocks[(p / bs) as usize] * bs + p % bs);
            }
        }
        let cumsum = |v: &[i32]| -> Vec<i32> {
            std::iter::once(0)
                .chain(v.iter().scan(0, |acc, &x| {
                    *acc += x;
                    Some(*acc)
                }))
                .collect()
        };
        let t = |v: &[i32]| Tensor::from_slice(v).to_device(device);
        StepMetadata {
            cu_seqlens_q: t(&cumsum(&q_lens)),
            cu_seqlens_k: t(&cumsum(&k_lens)),
            max_seqlen_q: q_lens.iter().copied().max().unwrap_or(0) as i64,
            max_seqlen_k: k_lens.iter().copied().max().unwrap_or(0) as i64,
            prompt_tail: prompt_tail(plan, &q_lens, &k_lens),
            continued_chunk: continued_chunk(plan, &q_lens, &k_lens),
            query_lengths: t(&q_lens),
            kv_seq_lengths: t(&k_lens),
            block_table: t(&table).reshape([n as i64, max_blocks as i64]),
            token_positions: Tensor::from_slice(&positions).to_device(device),
            slot_mapping: Tensor::from_slice(&slots).to_device(device),
        }
    }

    /// Ends the scheduled step after every layer ran it: its tokens count as cached.
    pub fn commit_step(&mut self) -> Result<StepPlan, InferenceError> {
        let step = self.step.take().ok_or(InferenceError::NoStep)?;
        for e in &step.plan.entries {
            if let Some(r) = self.requests.get_mut(&e.id) {
                r.cached += e.tokens;
            }
        }
        Ok(step.plan)
    }

    /// Drops the scheduled step: its blocks return to the pool and no request advances.
    pub fn abort_step(&mut self) -> Result<(), InferenceError> {
        let step = self.step.take().ok_or(InferenceError::NoStep)?;
        for (id, blocks) in step.new_blocks {
            if let Some(r) = self.requests.get_mut(&id) {
                r.blocks.truncate(r.blocks.len() - blocks.len());
            }
            self.allocator.release(&blocks);
        }
        Ok(())
    }

    fn layer_index(&self, layer_number: i64) -> Result<i64, InferenceError> {
        let idx = layer_number - self.pp_layer_offset - 1;
        if (0..self.num_layers).contains(&idx) {
            Ok(idx)
        } else {
            Err(InferenceError::UnknownLayer {
                layer_number,
                first: self.pp_layer_offset + 1,
                last: self.pp_layer_offset + self.num_layers,
            })
        }
    }
}

impl InferenceContext for DynamicInferenceContext {
    fn attend(
        &mut self,
        layer: &LayerContext<'_>,
        qkv: Qkv,
        input: &AttentionInput<'_>,
    ) -> Result<Tensor, ForwardError> {
        let Qkv { query, key, value } = qkv;
        let step = self.step.as_ref().ok_or(InferenceError::NoStep)?;
        let idx = self.layer_index(layer.layer_number)?;
        let scheduled = step.plan.total_tokens();
        let size = key.size();
        if size.len() != 4 || size[0] != scheduled || size[1] != 1 {
            return Err(InferenceError::StepShape {
                scheduled,
                got: size.first().copied().unwrap_or(0),
                shape: size,
            }
            .into());
        }
        if size[2] != self.kv_heads
            || size[3] != self.head_dim
            || key.kind() != self.memory.kind()
            || key.device() != self.memory.device()
        {
            return Err(InferenceError::LayoutMismatch {
                layer_number: layer.layer_number,
                reason: format!(
                    "memory holds {} heads of {} in {:?} on {:?}, the layer gives {size:?} {:?} on {:?}",
                    self.kv_heads,
                    self.head_dim,
                    self.memory.kind(),
                    self.memory.device(),
                    key.kind(),
                    key.device()
                ),
            }
            .into());
        }
        if input.attention_mask.is_some()
            || input.attention_bias.is_some()
            || input.packed_seq_params.is_some()
        {
            return Err(ForwardError::Unsupported {
                module: "DynamicInferenceContext",
                what: "attention masks, biases or packed sequences (the step's layout decides the mask)".into(),
            });
        }
        let meta = &step.meta;
        // 1. Rotary at each token's position in its request; keys are cached rotated.
        let (query, key) = match input.rotary_pos_emb.map(RotaryPosEmb::pair) {
            Some((q_emb, k_emb)) => {
                let rows = q_emb.size()[0].min(k_emb.size()[0]);
                if rows < meta.max_seqlen_k {
                    return Err(
                        InferenceError::RotaryTooShort { rows, needed: meta.max_seqlen_k }.into()
                    );
                }
                let interleaved = layer.config.rotary_interleaved;
                (
                    apply_rotary_pos_emb(
                        &query,
                        &q_emb.f_index_select(0, &meta.token_positions)?,
                        interleaved,
                    )?,
                    apply_rotary_pos_emb(
                        &key,
                        &k_emb.f_index_select(0, &meta.token_positions)?,
                        interleaved,
                    )?,
                )
            }
            None => (query, key),
        };
        // 2. Append and attend over the paged prefix.
        let key_cache = self.memory.f_select(0, 0)?.f_select(0, idx)?;
        let value_cache = self.memory.f_select(0, 1)?.f_select(0, idx)?;
        let input = CoreAttentionInput::new(&query, &key, &value, AttnMaskType::Causal);
        let paged = PagedKv {
            key_cache: &key_cache,
            value_cache: &value_cache,
            slot_mapping: &meta.slot_mapping,
            block_table: &meta.block_table,
            cu_seqlens_q: &meta.cu_seqlens_q,
            seqlens_k: &meta.kv_seq_lengths,
            max_seqlen_q: meta.max_seqlen_q,
            max_seqlen_k: meta.max_seqlen_k,
            prompt_tail: meta.prompt_tail,
            continued_chunk: meta.continued_chunk,
        };
        self.paged.forward_paged(&input, &paged)
    }
}
