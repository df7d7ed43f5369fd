//! Tokenizing texts into a padded batch with the model's `tokenizer.json`.
//!
//! The package's `tokenizer.json` carries the settings it was exported with: truncation at 128
//! and padding to a *fixed* 128. sentence-transformers overrides both when it encodes (pad to
//! the longest text of the batch, truncate at `max_seq_length` = 256), and so does
//! [`MiniLmTokenizer`].

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use tokenizers::{EncodeInput, PaddingStrategy, Tokenizer, TruncationParams, TruncationStrategy};

use crate::Error;

/// A tokenized batch, padded on the right to its longest text. All tensors are int64
/// `[n, s]` on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// Word-piece ids, `[CLS] … [SEP]` then `[PAD]` (id 0).
    pub input_ids: Tensor,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Tensor,
    /// Segment ids (all 0 for single texts).
    pub token_type_ids: Tensor,
}

impl Batch {
    /// The number of texts `n`.
    pub fn len(&self) -> i64 {
        self.input_ids.size()[0]
    }

    /// Whether the batch holds no text (never true for a batch from [`MiniLmTokenizer`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The padded length `s`.
    pub fn seq_len(&self) -> i64 {
        self.input_ids.size()[1]
    }
}

/// The model's word-piece tokenizer, set to pad to the longest text and truncate at
/// `max_length` tokens (special tokens included).
#[derive(Debug, Clone)]
pub struct MiniLmTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
}

impl MiniLmTokenizer {
    /// Loads `tokenizer.json` and sets its padding (to the longest text, keeping the file's
    /// pad token and id) and truncation (`max_length`, longest first).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, Error> {
        let load_err = |source| Error::TokenizerLoad { path: path.to_path_buf(), source };
        let mut tokenizer = Tokenizer::from_file(path).map_err(load_err)?;
        let mut padding = tokenizer.get_padding().cloned().unwrap_or_default();
        padding.strategy = PaddingStrategy::BatchLongest;
        padding.pad_to_multiple_of = None;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..TruncationParams::default()
            }))
            .map_err(load_err)?;
        Ok(Self { tokenizer, max_length })
    }

    /// The truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes `texts` (with `[CLS]`/`[SEP]`) into one padded batch. An empty list is
    /// [`Error::EmptyInput`].
    pub fn encode(&self, texts: &[&str]) -> Result<Batch, Error> {
        if texts.is_empty() {
            return Err(Error::EmptyInput);
        }
        let inputs: Vec<EncodeInput<'_>> = texts.iter().map(|t| (*t).into()).collect();
        let encodings = self.tokenizer.encode_batch(inputs, true).map_err(Error::Tokenize)?;
        let n = encodings.len() as i64;
        let s = encodings.first().map_or(0, |e| e.len()) as i64;
        let mut ids = Vec::with_capacity((n * s) as usize);
        let mut mask = Vec::with_capacity(ids.capacity());
        let mut types = Vec::with_capacity(ids.capacity());
        for e in &encodings {
            if e.len() as i64 != s {
                return Err(Error::Input {
                    name: "input_ids",
                    reason: format!("the tokenizer padded to {} and {s} tokens", e.len()),
                });
            }
            ids.extend(e.get_ids().iter().map(|&x| i64::from(x)));
            mask.extend(e.get_attention_mask().iter().map(|&x| i64::from(x)));
            types.extend(e.get_type_ids().iter().map(|&x| i64::from(x)));
        }
        let tensor = |v: &[i64]| -> Result<Tensor, Error> {
            Ok(Tensor::f_from_slice(v)?.f_reshape([n, s])?.f_to_kind(Kind::Int64)?)
        };
        Ok(Batch {
            input_ids: tensor(&ids)?,
            attention_mask: tensor(&mask)?,
            token_type_ids: tensor(&types)?,
        })
    }
}

/// `tokenizer.json` in a model directory.
pub(crate) fn tokenizer_path(model_dir: &Path) -> PathBuf {
    model_dir.join("tokenizer.json")
}
