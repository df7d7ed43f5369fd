//! The module registry: implementations register a [`ModuleFactory`] next to their code with
//! `inventory::submit!`, and specs name them by kind.
//!
//! Kind names are lowercase kebab-case and stable: they are part of the file format. Each kind
//! may also answer to aliases (Megatron's class names, e.g. `DotProductAttention`).
//! Semantics follow `typetag`: the kind map is built once, names are sorted, a name claimed
//! twice is an error naming both registrations, and an unknown kind lists every known kind.
//!
//! `inventory` registers before `main` only the crates a binary links: a binary that never
//! references `attention-core` has none of its kinds. Tests build explicit registries with
//! [`Registry::empty`] and [`Registry::with`], and assert that every built-in kind is present.
//!
//! Vocabulary of the built-in kinds (see each crate's docs):
//!
//! | kind | role | Megatron |
//! |---|---|---|
//! | `column-parallel-linear` | column-parallel linear | `ColumnParallelLinear` |
//! | `row-parallel-linear` | row-parallel linear | `RowParallelLinear` |
//! | `dot-product-attention` | core attention | `DotProductAttention` (local) |
//! | `sdpa` | core attention | libtorch `scaled_dot_product_attention` |
//! | `torch-norm` | norm | `WrappedTorchNorm` (follows `normalization`) |
//! | `layer-norm` | norm | `torch.nn.LayerNorm` |
//! | `rms-norm` | norm | `torch.nn.RMSNorm` |
//! | `l2-norm` | norm | `L2Norm` |
//! | `identity` | norm | `IdentityOp` |

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use tch::nn;

use crate::config::TransformerConfig;
use crate::error::{Names, Place, Result, SpecError};
use crate::module::{AttentionType, AttnMaskType, CoreAttention, Linear, Norm};

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Output-sharded linear: `linear_qkv`, `linear_q`, `linear_kv`.
    ColumnParallelLinear,
    /// Input-sharded linear: `linear_proj`.
    RowParallelLinear,
    /// `core_attention`.
    CoreAttention,
    /// `q_layernorm`, `k_layernorm`.
    Norm,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ColumnParallelLinear => "column-parallel linear",
            Self::RowParallelLinear => "row-parallel linear",
            Self::CoreAttention => "core attention",
            Self::Norm => "norm",
        })
    }
}

/// A kind's `params` table from the spec, with its place for error messages.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    /// The table as written (empty when absent).
    pub table: toml::Table,
    /// Where the spec that holds it is.
    pub place: Place,
}

/// The empty parameter set: kinds without parameters decode their table into it, which
/// rejects every key.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

impl Params {
    /// Decodes the table into a kind's strict parameter struct; errors name the kind and place.
    pub fn decode<T: DeserializeOwned>(&self, kind: &str) -> Result<T> {
        T::deserialize(toml::Value::Table(self.table.clone())).map_err(|e| SpecError::Params {
            place: self.place.key("params"),
            kind: kind.to_string(),
            message: e.message().to_string(),
        })
    }
}

/// Call-site arguments of a linear slot (Megatron's positional and keyword arguments).
#[derive(Debug)]
pub struct LinearArgs<'a> {
    /// Where the parameters go: `weight` and `bias` are created under it.
    pub path: &'a nn::Path<'a>,
    /// The resolved config.
    pub config: &'a TransformerConfig,
    /// The kind's own parameters.
    pub params: &'a Params,
    /// Input features (global).
    pub input_size: i64,
    /// Output features (global).
    pub output_size: i64,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Return the bias instead of adding it.
    pub skip_bias_add: bool,
    /// Std of the weight's normal init.
    pub init_std: f64,
}

/// Call-site arguments of a `core_attention` slot.
#[derive(Debug)]
pub struct CoreAttentionArgs<'a> {
    /// Where parameters go (core attentions built in so far have none).
    pub path: &'a nn::Path<'a>,
    /// The resolved config.
    pub config: &'a TransformerConfig,
    /// The kind's own parameters.
    pub params: &'a Params,
    /// Global 1-based layer number.
    pub layer_number: i64,
    /// The mask type the attention was built with.
    pub attn_mask_type: AttnMaskType,
    /// Self or cross.
    pub attention_type: AttentionType,
}

/// Call-site arguments of a norm slot.
#[derive(Debug)]
pub struct NormArgs<'a> {
    /// Where `weight` (and `bias`) go.
    pub path: &'a nn::Path<'a>,
    /// The resolved config.
    pub config: &'a TransformerConfig,
    /// The kind's own parameters.
    pub params: &'a Params,
    /// Size of the normalized (last) dimension.
    pub hidden_size: i64,
    /// Epsilon.
    pub eps: f64,
}

/// Builds a linear layer.
pub type LinearBuilder = fn(&LinearArgs<'_>) -> Result<Box<dyn Linear>>;
/// Builds a core attention.
pub type CoreAttentionBuilder = fn(&CoreAttentionArgs<'_>) -> Result<Box<dyn CoreAttention>>;
/// Builds a norm.
pub type NormBuilder = fn(&NormArgs<'_>) -> Result<Box<dyn Norm>>;

/// How a kind is built; the variant decides the kind's [`Role`].
#[derive(Clone, Copy)]
pub enum Builder {
    /// A column-parallel linear.
    ColumnParallelLinear(LinearBuilder),
    /// A row-parallel linear.
    RowParallelLinear(LinearBuilder),
    /// A core attention.
    CoreAttention(CoreAttentionBuilder),
    /// A norm.
    Norm(NormBuilder),
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Builder({})", self.role())
    }
}

impl Builder {
    /// The role the builder's modules play.
    pub const fn role(&self) -> Role {
        match self {
            Self::ColumnParallelLinear(_) => Role::ColumnParallelLinear,
            Self::RowParallelLinear(_) => Role::RowParallelLinear,
            Self::CoreAttention(_) => Role::CoreAttention,
            Self::Norm(_) => Role::Norm,
        }
    }
}

/// One registered module kind.
#[derive(Debug)]
pub struct ModuleFactory {
    /// The stable kind name.
    pub kind: &'static str,
    /// Other names accepted in specs (Megatron class names).
    pub aliases: &'static [&'static str],
    /// One line for `attn check` and the docs.
    pub summary: &'static str,
    /// `module_path!()` of the registration, for duplicate errors.
    pub registered_in: &'static str,
    /// The constructor.
    pub builder: Builder,
}

impl ModuleFactory {
    /// The kind's role.
    pub const fn role(&self) -> Role {
        self.builder.role()
    }
}

inventory::collect!(ModuleFactory);

/// A kind → factory map.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_name: BTreeMap<&'static str, &'static ModuleFactory>,
}

impl Registry {
    /// A registry with no kinds.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Adds a factory under its kind and aliases; a name already taken is an error naming
    /// both registrations, and leaves the registry unchanged.
    pub fn register(&mut self, factory: &'static ModuleFactory) -> Result<()> {
        let names = std::iter::once(factory.kind).chain(factory.aliases.iter().copied());
        for name in names.clone() {
            if let Some(other) = self.by_name.get(name) {
                return Err(SpecError::DuplicateKind {
                    kind: name.to_string(),
                    first: format!("{} (kind \"{}\")", other.registered_in, other.kind),
                    second: format!("{} (kind \"{}\")", factory.registered_in, factory.kind),
                });
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for name in names {
            if seen.contains(&name) {
                return Err(SpecError::DuplicateKind {
                    kind: name.to_string(),
                    first: factory.registered_in.to_string(),
                    second: factory.registered_in.to_string(),
                });
            }
            seen.push(name);
        }
        for name in seen {
            self.by_name.insert(name, factory);
        }
        Ok(())
    }

    /// Builder-style [`register`](Self::register).
    pub fn with(mut self, factory: &'static ModuleFactory) -> Result<Self> {
        self.register(factory)?;
        Ok(self)
    }

    /// Every kind registered with `inventory` in the crates linked into this binary, built
    /// once. Registration order does not matter; a duplicate name is an error.
    pub fn global() -> Result<&'static Registry> {
        static GLOBAL: OnceLock<std::result::Result<Registry, (String, String, String)>> =
            OnceLock::new();
        let built = GLOBAL.get_or_init(|| {
            let mut factories: Vec<&'static ModuleFactory> =
                inventory::iter::<ModuleFactory>.into_iter().collect();
            // Deterministic duplicate reports whatever the link order.
            factories.sort_by_key(|f| (f.kind, f.registered_in));
            let mut registry = Registry::empty();
            for f in factories {
                if let Err(SpecError::DuplicateKind { kind, first, second }) = registry.register(f)
                {
                    return Err((kind, first, second));
                }
            }
            Ok(registry)
        });
        match built {
            Ok(r) => Ok(r),
            Err((kind, first, second)) => Err(SpecError::DuplicateKind {
                kind: kind.clone(),
                first: first.clone(),
                second: second.clone(),
            }),
        }
    }

    /// The factory for a kind name or alias.
    pub fn get(&self, name: &str) -> Option<&'static ModuleFactory> {
        self.by_name.get(name).copied()
    }

    /// The factory for `name`, or an [`SpecError::UnknownKind`] at `place` listing the kinds.
    pub fn lookup(&self, name: &str, place: &Place) -> Result<&'static ModuleFactory> {
        self.get(name).ok_or_else(|| SpecError::UnknownKind {
            place: place.clone(),
            kind: name.to_string(),
            known: Names(self.kinds().iter().map(|k| k.to_string()).collect()),
        })
    }

    /// The canonical kind names, sorted (aliases left out).
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> =
            self.by_name.iter().filter(|(n, f)| **n == f.kind).map(|(n, _)| *n).collect();
        kinds.sort_unstable();
        kinds
    }

    /// The factories, one per kind, sorted by kind.
    pub fn factories(&self) -> Vec<&'static ModuleFactory> {
        self.kinds().into_iter().filter_map(|k| self.get(k)).collect()
    }
}
