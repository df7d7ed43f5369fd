//! Loading parameters by their Megatron state-dict names.
//!
//! A module's parameters live in a tch `VarStore` under the names Megatron gives them
//! (`linear_qkv.weight`, `q_layernorm.weight`, ...), so a Megatron checkpoint exported to
//! safetensors loads by name. Loading checks every name and shape before it copies anything,
//! so a failed load leaves the parameters as they were.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Tensor, nn::VarStore};

/// Why parameters could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read as safetensors.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// libtorch's error.
        source: tch::TchError,
    },
    /// A parameter has no tensor in the source.
    #[error("missing tensor `{name}` for parameter `{param}`")]
    Missing {
        /// The name looked up (prefix included).
        name: String,
        /// The parameter.
        param: String,
    },
    /// A tensor's shape differs from its parameter's.
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The parameter's shape.
        expected: Vec<i64>,
        /// The tensor's shape.
        got: Vec<i64>,
    },
    /// With `strict`, a tensor under the prefix that no parameter takes.
    #[error("unexpected tensor `{name}`: no parameter of that name")]
    Unexpected {
        /// The tensor's name.
        name: String,
    },
    /// libtorch failed while copying.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Copies `tensors[prefix + name]` into every parameter `name` of `vs` (converting dtype and
/// device). With `strict`, a tensor named `prefix...` that matches no parameter is an error.
/// Nothing is copied unless every parameter has a tensor of the right shape.
pub fn load_named(
    vs: &VarStore,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    strict: bool,
) -> Result<(), LoadError> {
    let vars = vs.variables();
    let mut pairs = Vec::with_capacity(vars.len());
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for param in names {
        let var = &vars[param];
        let name = format!("{prefix}{param}");
        let src = tensors
            .get(&name)
            .ok_or_else(|| LoadError::Missing { name: name.clone(), param: param.clone() })?;
        if src.size() != var.size() {
            return Err(LoadError::Shape { name, expected: var.size(), got: src.size() });
        }
        pairs.push((var, src));
    }
    if strict {
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|n| n.starts_with(prefix) && !vars.contains_key(&n[prefix.len()..]))
            .collect();
        extra.sort();
        if let Some(name) = extra.first() {
            return Err(LoadError::Unexpected { name: (*name).clone() });
        }
    }
    tch::no_grad(|| -> Result<(), LoadError> {
        for (var, src) in pairs {
            let mut dst = var.shallow_clone();
            dst.f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
        }
        Ok(())
    })
}

/// Reads every tensor of a safetensors file, by name.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    let tensors = Tensor::read_safetensors(path)
        .map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    Ok(tensors.into_iter().collect())
}

/// [`load_named`] from a safetensors file.
pub fn load_safetensors(
    vs: &VarStore,
    path: &Path,
    prefix: &str,
    strict: bool,
) -> Result<(), LoadError> {
    load_named(vs, &read_safetensors(path)?, prefix, strict)
}
