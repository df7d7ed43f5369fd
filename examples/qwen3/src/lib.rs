//! A Qwen3-style decoder (GQA, RMSNorm Q/K norms, rotary, SwiGLU MLP, tied or untied
//! embeddings) built around the project's `SelfAttention`, loading a Hugging Face
//! `Qwen3ForCausalLM` checkpoint, and generating greedily in the static KV cache
//! ([`Qwen3::generate_static`]) and in the paged dynamic context with all prompts in one batch
//! and chunked prefill ([`Qwen3::generate_dynamic`]).
//!
//! Everything model-specific (embeddings, RMSNorm, SwiGLU MLP, the decoder layer, the LM head)
//! is written here using only the public APIs of `attention-spec`, `attention-core` and
//! `attention-inference`: the attention is resolved from a model TOML through the spec
//! machinery, its weights converted with `attention_core::convert` and loaded by name. The
//! example doubles as proof that those APIs are enough to carry a real decoder.
//!
//! The committed fixture (`fixtures/`, written by `tools/hf-reference/qwen3_fixture.py`) is a
//! small random model with the greedy continuations and logits of Hugging Face `generate`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use attention_core::convert::{AttentionDims, HfLayout, hf_to_megatron};
use attention_core::inference::InferenceContext;
use attention_core::weights::{LoadError, load_named, read_safetensors};
use attention_core::{Attention, AttentionInput, BuiltLayers, RotaryEmbedding, SelfAttention};
use attention_inference::{
    DynamicContextOptions, DynamicInferenceContext, InferenceError, KvMemory,
    StaticInferenceContext,
};
use attention_spec::{ForwardError, Model, SpecError};
use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Everything that can go wrong loading or running the decoder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading a file.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A checkpoint tensor is missing.
    #[error("checkpoint has no tensor `{0}`")]
    Missing(String),
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Expected.
        expected: Vec<i64>,
        /// Found.
        got: Vec<i64>,
    },
    /// The config is not one this example supports.
    #[error("config: {0}")]
    Config(String),
    /// Bad arguments (empty prompts, token ids out of range).
    #[error("{0}")]
    Invalid(String),
    /// Spec resolution or building.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Weight conversion.
    #[error(transparent)]
    Convert(#[from] attention_core::convert::ConvertError),
    /// Weight loading.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A forward.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// An inference context refused a call.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The fields of Hugging Face's `Qwen3Config` this decoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// MLP inner size.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads.
    pub num_key_value_heads: i64,
    /// Head dimension.
    pub head_dim: i64,
    /// Longest sequence.
    pub max_position_embeddings: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias in q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Hidden activation (`silu`).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// transformers 5 keeps `rope_theta` here.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// transformers 4 keeps it here.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `rope_parameters` of a transformers 5 config.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    /// Base period.
    pub rope_theta: f64,
    /// Only `default` is supported.
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn silu() -> String {
    "silu".into()
}

impl Qwen3Config {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Read { path: path.into(), reason: e.to_string() })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Read { path: path.into(), reason: e.to_string() })
    }

    fn rope_theta(&self) -> Result<f64, Error> {
        match (&self.rope_parameters, self.rope_theta) {
            (Some(p), _) if p.rope_type.as_deref().is_none_or(|t| t == "default") => {
                Ok(p.rope_theta)
            }
            (Some(p), _) => {
                Err(Error::Config(format!("rope_type {:?} is not supported", p.rope_type)))
            }
            (None, Some(t)) => Ok(t),
            (None, None) => Ok(10_000.0),
        }
    }

    /// The attention of every layer as a model file: Megatron `TransformerConfig` fields and
    /// the `gpt-local` spec with the given core attention.
    pub fn attention_toml(&self, core_attention: &str) -> Result<String, Error> {
        if self.hidden_act != "silu" {
            return Err(Error::Config(format!("hidden_act {:?} (only silu)", self.hidden_act)));
        }
        Ok(format!(
            "[transformer]\nnum_layers = {}\nhidden_size = {}\nnum_attention_heads = {}\nnum_query_groups = {}\n\
             kv_channels = {}\nattention_dropout = 0.0\nqk_layernorm = true\nnormalization = \"RMSNorm\"\n\
             layernorm_epsilon = {:e}\nadd_bias_linear = false\nadd_qkv_bias = {}\n\
             position_embedding_type = \"rope\"\nrotary_base = {:e}\n\n\
             [attention]\npreset = \"gpt-local\"\nsubmodules = {{ core_attention = \"{core_attention}\" }}\n",
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.rms_norm_eps,
            self.attention_bias,
            self.rope_theta()?,
        ))
    }
}

/// One decoder layer: pre-norm attention and SwiGLU MLP, both residual.
#[derive(Debug)]
struct DecoderLayer {
    input_norm: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The decoder.
#[derive(Debug)]
pub struct Qwen3 {
    config: Qwen3Config,
    model: Model,
    _vs: VarStore,
    attentions: BuiltLayers,
    layers: Vec<DecoderLayer>,
    embed: Tensor,
    norm: Tensor,
    lm_head: Tensor,
    rope: Tensor,
    device: Device,
}

/// Generated tokens, the logits of every step, and per-phase timings.
#[derive(Debug)]
pub struct Generation {
    /// New token ids.
    pub tokens: Vec<i64>,
    /// `[new_tokens, vocab]`: the logits each token was chosen from.
    pub logits: Tensor,
}

/// Tokens and seconds of the prefill and decode phases of a generation run.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    /// Prompt tokens processed.
    pub prefill_tokens: i64,
    /// Seconds in steps holding prompt tokens.
    pub prefill_seconds: f64,
    /// Decode tokens processed.
    pub decode_tokens: i64,
    /// Seconds in decode-only steps.
    pub decode_seconds: f64,
}

fn take(
    map: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[i64],
    device: Device,
) -> Result<Tensor, Error> {
    let t = map.remove(name).ok_or_else(|| Error::Missing(name.into()))?;
    if t.size() != shape {
        return Err(Error::Shape { name: name.into(), expected: shape.to_vec(), got: t.size() });
    }
    Ok(t.to_kind(Kind::Float).to_device(device))
}

impl Qwen3 {
    /// Builds the decoder from a Hugging Face checkpoint (`config.json` and `model.safetensors`
    /// in `dir`), with the given core attention kind, in fp32 on `device`.
    pub fn load(dir: &Path, core_attention: &str, device: Device) -> Result<Self, Error> {
        let config = Qwen3Config::from_file(&dir.join("config.json"))?;
        let mut weights = read_safetensors(&dir.join("model.safetensors"))?;
        Self::from_weights(config, &mut weights, core_attention, device)
    }

    /// Builds the decoder from a config and Hugging Face-named tensors (consumed).
    pub fn from_weights(
        config: Qwen3Config,
        weights: &mut HashMap<String, Tensor>,
        core_attention: &str,
        device: Device,
    ) -> Result<Self, Error> {
        // 1. The attentions, through the spec machinery; HF weights converted and loaded by name.
        let model = Model::from_toml_str(
            &config.attention_toml(core_attention)?,
            attention_core::registry()?,
        )?;
        let vs = VarStore::new(device);
        let attentions = BuiltLayers::build(&vs.root(), &model)?;
        let dims = AttentionDims {
            num_attention_heads: config.num_attention_heads,
            num_query_groups: config.num_key_value_heads,
            kv_channels: config.head_dim,
        };
        let mut converted = HashMap::new();
        for (number, prefix, _) in &attentions.layers {
            let hf = format!("model.layers.{}.self_attn.", number - 1);
            hf_to_megatron(
                HfLayout::Llama,
                dims,
                weights,
                &hf,
                &format!("{prefix}."),
                &mut converted,
            )?;
            for n in ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"] {
                for w in ["weight", "bias"] {
                    weights.remove(&format!("{hf}{n}.{w}"));
                }
            }
        }
        load_named(&vs, &converted, "", true)?;
        // 2. Everything around the attention.
        let (h, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = |n: &str| format!("model.layers.{i}.{n}");
            layers.push(DecoderLayer {
                input_norm: take(weights, &p("input_layernorm.weight"), &[h], device)?,
                post_norm: take(weights, &p("post_attention_layernorm.weight"), &[h], device)?,
                gate: take(weights, &p("mlp.gate_proj.weight"), &[f, h], device)?,
                up: take(weights, &p("mlp.up_proj.weight"), &[f, h], device)?,
                down: take(weights, &p("mlp.down_proj.weight"), &[h, f], device)?,
            });
        }
        let embed = take(weights, "model.embed_tokens.weight", &[v, h], device)?;
        let norm = take(weights, "model.norm.weight", &[h], device)?;
        let lm_head = if config.tie_word_embeddings {
            weights.remove("lm_head.weight");
            embed.shallow_clone()
        } else {
            take(weights, "lm_head.weight", &[v, h], device)?
        };
        if let Some(extra) = weights.keys().next() {
            return Err(Error::Config(format!("unused checkpoint tensor `{extra}`")));
        }
        let rope = RotaryEmbedding::from_config(&model.config).forward(
            config.max_position_embeddings,
            0,
            device,
        );
        Ok(Self { config, model, _vs: vs, attentions, layers, embed, norm, lm_head, rope, device })
    }

    /// The Hugging Face config.
    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// The resolved attention model (Megatron config and specs).
    pub fn attention_model(&self) -> &Model {
        &self.model
    }

    fn attention(&self, i: usize) -> Result<&SelfAttention, Error> {
        match self.attentions.layers.get(i).map(|l| &l.2) {
            Some(Attention::SelfAttention(a)) => Ok(a),
            _ => Err(Error::Config(format!("layer {i} is not a self attention"))),
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor, Error> {
        Ok(x.f_rms_norm([self.config.hidden_size], Some(w), self.config.rms_norm_eps)?)
    }

    /// Logits `[s, b, vocab]` of token ids `[s, b]` run through every layer in `context`.
    pub fn forward(
        &self,
        tokens: &Tensor,
        context: &mut dyn InferenceContext,
    ) -> Result<Tensor, Error> {
        let v = self.config.vocab_size;
        let ids = tokens.to_device(self.device);
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= v {
            return Err(Error::Invalid(format!("token ids must be in 0..{v}, got {lo}..={hi}")));
        }
        // [s, b] -> [s, b, h]
        let mut x = Tensor::f_embedding(&self.embed, &ids, -1, false, false)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = self.rms_norm(&x, &layer.input_norm)?;
            let input = AttentionInput::new(&normed).with_rotary(&self.rope);
            let attn = self.attention(i)?.forward_with_context(&input, context)?;
            x = x.f_add(&attn.output)?;
            let normed = self.rms_norm(&x, &layer.post_norm)?;
            let gate = normed.f_matmul(&layer.gate.f_tr()?)?.f_silu()?;
            let up = normed.f_matmul(&layer.up.f_tr()?)?;
            x = x.f_add(&gate.f_mul(&up)?.f_matmul(&layer.down.f_tr()?)?)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        Ok(x.f_matmul(&self.lm_head.f_tr()?)?)
    }

    fn check_prompt(&self, prompt: &[i64], new_tokens: i64) -> Result<(), Error> {
        let total = prompt.len() as i64 + new_tokens;
        if prompt.is_empty() || new_tokens < 1 || total > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "need a non-empty prompt, at least one new token, and prompt + new tokens <= {} (got {} + {new_tokens})",
                self.config.max_position_embeddings,
                prompt.len()
            )));
        }
        Ok(())
    }

    /// Greedy generation of one prompt in the static KV cache.
    pub fn generate_static(
        &self,
        prompt: &[i64],
        new_tokens: i64,
        times: &mut PhaseTimes,
    ) -> Result<Generation, Error> {
        self.check_prompt(prompt, new_tokens)?;
        let _guard = tch::no_grad_guard();
        let mut ctx = StaticInferenceContext::new(1, prompt.len() as i64 + new_tokens)?;
        let mut tokens = Vec::new();
        let mut logits = Vec::new();
        let mut input = Tensor::from_slice(prompt).view([-1, 1]);
        for step in 0..new_tokens {
            let t0 = Instant::now();
            let out = self.forward(&input, &mut ctx)?;
            let last = out.f_select(0, out.size()[0] - 1)?.f_select(0, 0)?; // [vocab]
            let next = last.argmax(-1, false).int64_value(&[]);
            let secs = t0.elapsed().as_secs_f64();
            if step == 0 {
                times.prefill_tokens += prompt.len() as i64;
                times.prefill_seconds += secs;
            } else {
                times.decode_tokens += 1;
                times.decode_seconds += secs;
            }
            ctx.advance(input.size()[0])?;
            ctx.enable_decode_mode();
            tokens.push(next);
            logits.push(last.to_device(Device::Cpu));
            input = Tensor::from_slice(&[next]).view([1, 1]);
        }
        Ok(Generation { tokens, logits: Tensor::f_stack(&logits, 0)? })
    }

    /// Greedy generation of every prompt at once in the paged dynamic context: token-flattened
    /// steps of at most `token_budget` tokens (a smaller budget than the longest prompt chunks
    /// the prefill), decode tokens and prompt chunks mixed, blocks of `block_size` tokens.
    pub fn generate_dynamic(
        &self,
        prompts: &[Vec<i64>],
        new_tokens: i64,
        block_size: i64,
        token_budget: i64,
        times: &mut PhaseTimes,
    ) -> Result<Vec<Generation>, Error> {
        if prompts.is_empty() {
            return Err(Error::Invalid("no prompts".into()));
        }
        for p in prompts {
            self.check_prompt(p, new_tokens)?;
        }
        let _guard = tch::no_grad_guard();
        let blocks: i64 = prompts
            .iter()
            .map(|p| (p.len() as i64 + new_tokens + block_size - 1) / block_size)
            .sum();
        let options = DynamicContextOptions::new(
            self.config.num_hidden_layers,
            block_size,
            KvMemory::Blocks(blocks),
        );
        let mut ctx = DynamicInferenceContext::new(
            &self.model.config,
            &options,
            Kind::Float,
            self.device,
            attention_core::registry()?,
        )
        .map_err(Error::Spec)?;
        // Each request's full token list so far: prompt, then generated tokens.
        let mut seqs: Vec<Vec<i64>> = prompts.to_vec();
        let mut logits: Vec<Vec<Tensor>> = prompts.iter().map(|_| Vec::new()).collect();
        for (i, p) in prompts.iter().enumerate() {
            ctx.add_request(i as u64, p.len() as i64)?;
        }
        while !ctx.request_ids().is_empty() {
            let plan = ctx.schedule(token_budget)?;
            if plan.is_empty() {
                return Err(Error::Invalid(format!(
                    "nothing fits a token budget of {token_budget}"
                )));
            }
            let ids: Vec<i64> = plan
                .entries
                .iter()
                .flat_map(|e| {
                    seqs[e.id as usize][e.start as usize..(e.start + e.tokens) as usize].to_vec()
                })
                .collect();
            let t0 = Instant::now();
            let out = match self.forward(&Tensor::from_slice(&ids).view([-1, 1]), &mut ctx) {
                Ok(out) => out,
                Err(e) => {
                    ctx.abort_step()?;
                    return Err(e);
                }
            };
            ctx.commit_step()?;
            let mut row = 0;
            let mut finished = Vec::new();
            for e in &plan.entries {
                row += e.tokens;
                let r = e.id as usize;
                // A request's prompt is done (or a decode token ran): its last row picks the next token.
                if e.start + e.tokens == seqs[r].len() as i64 {
                    let last = out.f_select(0, row - 1)?.f_select(0, 0)?;
                    seqs[r].push(last.argmax(-1, false).int64_value(&[]));
                    logits[r].push(last.to_device(Device::Cpu));
                    if logits[r].len() as i64 == new_tokens {
                        finished.push(e.id);
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            if plan.entries.iter().all(|e| e.decode) {
                times.decode_tokens += plan.total_tokens();
                times.decode_seconds += secs;
            } else {
                times.prefill_tokens += plan.total_tokens();
                times.prefill_seconds += secs;
            }
            for id in finished {
                ctx.finish_request(id)?;
            }
        }
        prompts
            .iter()
            .zip(seqs)
            .zip(logits)
            .map(|((p, s), l)| {
                Ok(Generation { tokens: s[p.len()..].to_vec(), logits: Tensor::f_stack(&l, 0)? })
            })
            .collect()
    }
}

/// `examples/qwen3/fixtures`: the committed checkpoint and Hugging Face generations.
pub fn fixture_dir() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    if built.is_dir() { built } else { PathBuf::from("examples/qwen3/fixtures") }
}

/// One prompt of the fixture with Hugging Face's greedy continuation.
#[derive(Debug)]
pub struct Reference {
    /// The prompt's token ids.
    pub prompt: Vec<i64>,
    /// The generated token ids (without the prompt).
    pub tokens: Vec<i64>,
    /// float32 `[new_tokens, vocab]`: the logits each generated token was chosen from.
    pub logits: Tensor,
}

/// The prompts, Hugging Face's greedy tokens and logits of the fixture.
pub fn fixture_generations(dir: &Path) -> Result<Vec<Reference>, Error> {
    let mut t = read_safetensors(&dir.join("generation.safetensors"))?;
    let mut out = Vec::new();
    for i in 0.. {
        let Some(prompt) = t.remove(&format!("prompt.{i}")) else { break };
        let tokens = t
            .remove(&format!("tokens.{i}"))
            .ok_or_else(|| Error::Missing(format!("tokens.{i}")))?;
        let logits = t
            .remove(&format!("logits.{i}"))
            .ok_or_else(|| Error::Missing(format!("logits.{i}")))?;
        out.push(Reference {
            prompt: Vec::<i64>::try_from(&prompt)?,
            tokens: Vec::<i64>::try_from(&tokens)?,
            logits,
        });
    }
    Ok(out)
}
