//! Model files: `[transformer]`, an optional shared `[attention]` spec and optional
//! `[[layers]]`, as written ([`ModelSpec`]) and resolved ([`Model`]).
//!
//! ```toml
//! [transformer]                # Megatron TransformerConfig fields
//! hidden_size = 1024
//! num_attention_heads = 16
//! num_query_groups = 4
//!
//! [attention]                  # optional; default: preset = "gpt-local"
//! preset = "gpt-local"
//!
//! [[layers]]                   # optional; default: one layer per num_layers
//! layer_number = 1             # global, 1-based; default: position in the list
//! [[layers]]
//! layer_number = 2
//! attention = { preset = "gpt-local", submodules = { core_attention = "sdpa" } }
//! ```
//!
//! A layer's own `attention` replaces the shared one. Layer numbers matter: they scale the
//! scores under `apply_query_key_layer_scaling` and key the inference caches.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{TransformerConfig, TransformerConfigSpec};
use crate::error::{Place, Result, Segment, SpecError};
use crate::registry::Registry;
use crate::spec::{AttentionSpec, ResolvedAttention};

/// A whole model file as written.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `[transformer]`; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer: Option<TransformerConfigSpec>,
    /// `[attention]`: the spec of every layer without its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionSpec>,
    /// `[[layers]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerSpec>,
}

/// One `[[layers]]` entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Global 1-based layer number; default: 1 + the entry's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_number: Option<i64>,
    /// This layer's attention spec; default: `[attention]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionSpec>,
}

/// One resolved layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Global 1-based layer number.
    pub layer_number: i64,
    /// Its attention.
    pub attention: ResolvedAttention,
}

/// A model file resolved against a registry: the config and every layer's attention.
#[derive(Debug, Clone)]
pub struct Model {
    /// The resolved `[transformer]`.
    pub config: TransformerConfig,
    /// The layers, in file order.
    pub layers: Vec<Layer>,
}

/// The 1-based line and column (in characters, as the `toml` crate counts) of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// The 1-based line and column of the deepest part of `path` present in `source`.
pub(crate) fn locate(source: &str, path: &[Segment]) -> Option<(usize, usize)> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(source).ok()?;
    let mut best = None;
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut value: Option<&DeValue<'_>> = None;
    // Stop at the first segment that is not in the text: its parent is the deepest part found.
    for seg in path {
        match seg {
            Segment::Key(k) => {
                let Some((key, v)) = table
                    .or_else(|| value.and_then(|v| v.as_table()))
                    .and_then(|t| t.get_key_value(k.as_str()))
                else {
                    break;
                };
                best = Some(key.span().start);
                value = Some(v.get_ref());
                table = None;
            }
            Segment::Index(i) => {
                let Some(v) = value.and_then(|v| v.as_array()).and_then(|a| a.get(*i)) else {
                    break;
                };
                best = Some(v.span().start);
                value = Some(v.get_ref());
                table = None;
            }
        }
    }
    best.map(|o| line_col(source, o))
}

impl ModelSpec {
    /// Parses TOML text; errors carry line and column.
    pub fn from_toml_str(source: &str) -> Result<Self> {
        toml::from_str(source).map_err(|e| SpecError::Toml {
            place: Place {
                path: Vec::new(),
                line_col: e.span().map(|s| line_col(source, s.start)),
            },
            message: e.message().trim_end().to_string(),
        })
    }

    /// The TOML text of this spec (round-trips through [`from_toml_str`](Self::from_toml_str)).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self)
            .map_err(|e| SpecError::Toml { place: Place::root(), message: e.to_string() })
    }

    /// Validates the config and resolves every layer's attention against `registry`.
    pub fn resolve(&self, registry: &Registry) -> Result<Model> {
        let root = Place::root();
        let transformer = self
            .transformer
            .as_ref()
            .ok_or(SpecError::MissingField { place: root.clone(), field: "transformer" })?;
        let config = transformer.resolve(&root.key("transformer"), self.layers.len())?;
        let default_attention = AttentionSpec::preset("gpt-local");
        let (shared, shared_place) = match &self.attention {
            Some(a) => (a, root.key("attention")),
            None => (&default_attention, root.key("attention")),
        };
        let mut layers = Vec::new();
        if self.layers.is_empty() {
            let attention = shared.resolve(&config, registry, &shared_place)?;
            for n in 1..=config.num_layers {
                layers.push(Layer { layer_number: n, attention: attention.clone() });
            }
            return Ok(Model { config, layers });
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let place = root.key("layers").index(i);
            let layer_number = layer.layer_number.unwrap_or(i as i64 + 1);
            if layer_number < 1 || layer_number > config.num_layers {
                return Err(SpecError::InvalidValue {
                    place: place.key("layer_number"),
                    field: "layer_number",
                    value: layer_number.to_string(),
                    reason: format!("must be in 1..={} (num_layers)", config.num_layers),
                });
            }
            if layers.iter().any(|l: &Layer| l.layer_number == layer_number) {
                return Err(SpecError::Incompatible {
                    place: place.key("layer_number"),
                    reason: format!("layer_number {layer_number} is declared twice"),
                });
            }
            let attention = match &layer.attention {
                Some(a) => a.resolve(&config, registry, &place.key("attention"))?,
                None => shared.resolve(&config, registry, &shared_place)?,
            };
            layers.push(Layer { layer_number, attention });
        }
        Ok(Model { config, layers })
    }
}

impl Model {
    /// Parses and resolves TOML text; every error carries its line and column.
    pub fn from_toml_str(source: &str, registry: &Registry) -> Result<Self> {
        ModelSpec::from_toml_str(source)
            .and_then(|spec| spec.resolve(registry))
            .map_err(|e| e.locate(source))
    }

    /// Reads, parses and resolves a model file.
    pub fn from_path(path: &Path, registry: &Registry) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .map_err(|source| SpecError::Io { path: path.to_path_buf(), source })?;
        Self::from_toml_str(&source, registry)
    }

    /// The layer with a given global layer number.
    pub fn layer(&self, layer_number: i64) -> Option<&Layer> {
        self.layers.iter().find(|l| l.layer_number == layer_number)
    }
}
