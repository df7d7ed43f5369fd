//! The crate's error type.

use std::path::PathBuf;

use attention_core::convert::ConvertError;
use attention_core::weights::LoadError;
use attention_spec::{ForwardError, SpecError};

/// Why loading the model, tokenizing or embedding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No model directory was found (see [`crate::model_dir`]).
    #[error("all-MiniLM-L6-v2 model directory not found; looked in: {}", list(searched))]
    ModelDirNotFound {
        /// Every place looked at, in order (`python3*` stands for any Python version).
        searched: Vec<PathBuf>,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A JSON file of the model could not be decoded.
    #[error("cannot decode {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error.
        source: serde_json::Error,
    },
    /// The model's own configuration contradicts what this crate implements.
    #[error("{path}: {reason}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What does not match, with values.
        reason: String,
    },
    /// `tokenizer.json` could not be loaded or configured.
    #[error("tokenizer {path}")]
    TokenizerLoad {
        /// The file.
        path: PathBuf,
        /// The `tokenizers` crate's error.
        source: tokenizers::Error,
    },
    /// Tokenizing the texts failed.
    #[error("tokenizing failed: {0}")]
    Tokenize(#[source] tokenizers::Error),
    /// An empty list of texts was given.
    #[error("no texts given: need at least one text to embed")]
    EmptyInput,
    /// A weight the encoder needs is absent.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// The tensor's name in the Hugging Face checkpoint.
        name: String,
    },
    /// A weight has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected}, got {got:?}")]
    TensorShape {
        /// The tensor's name in the Hugging Face checkpoint.
        name: String,
        /// The expected shape, in words (`[vocab, 384]`).
        expected: String,
        /// The tensor's shape.
        got: Vec<i64>,
    },
    /// The model file asks for something this encoder does not implement.
    #[error("unsupported model: {reason}")]
    Unsupported {
        /// What, with values.
        reason: String,
    },
    /// An encoder input (token ids, masks) is malformed.
    #[error("{name}: {reason}")]
    Input {
        /// Which input.
        name: &'static str,
        /// What is wrong, with values.
        reason: String,
    },
    /// The model file could not be parsed, resolved or built.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An attention's Hugging Face weights could not be converted (names the tensor).
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// Converted attention weights could not be loaded into the attentions (names the tensor).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// An attention forward refused its input.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn list(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}
