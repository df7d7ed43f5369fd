//! Attention specs: Megatron's `ModuleSpec` tree for an attention, as written in TOML
//! ([`AttentionSpec`]) and resolved against a [`Registry`] ([`ResolvedAttention`]).
//!
//! ```toml
//! [attention]
//! preset = "gpt-local"                 # Megatron's get_gpt_layer_local_spec attention
//! params = { attn_mask_type = "causal" }
//! [attention.submodules]
//! core_attention = "sdpa"              # a slot is a kind name ...
//! q_layernorm = { module = "rms-norm" } # ... or an inline spec table (module, params, submodules)
//! ```
//!
//! Presets: `gpt-local` (self attention, `attn_mask_type = causal`, `column-parallel-linear` /
//! `dot-product-attention` / `row-parallel-linear`, Q/K norms by `qk_layernorm` /
//! `qk_l2_norm`) and `t5-cross-local` (cross attention of Megatron's local T5 decoder,
//! `attn_mask_type = arbitrary`). Slots and params written next to a preset override it.
//!
//! Q/K norm slots follow `SelfAttention.__init__`: with `qk_l2_norm` an empty slot is
//! `l2-norm`; with `qk_layernorm` an empty slot is `torch-norm` (Megatron would take TE's
//! `TENorm`, which computes the same norm); with both off a slot must be empty or `identity`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::TransformerConfig;
use crate::error::{Names, Place, Result, SpecError};
use crate::module::AttnMaskType;
use crate::registry::{ModuleFactory, Params, Registry, Role};

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &["gpt-local", "t5-cross-local"];

/// An attention spec as written: a preset and/or a module, its params and its submodules.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSpec {
    /// A named starting point (see [`PRESETS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// `self-attention` or `cross-attention` (aliases `SelfAttention`, `CrossAttention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The attention's own parameters: `attn_mask_type` (default `padding`, as Megatron).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub params: toml::Table,
    /// Slot name → kind or inline spec.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub submodules: BTreeMap<String, SlotSpec>,
}

/// A submodule slot: a kind name, or an inline spec.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotSpec {
    /// `slot = "kind"`.
    Kind(String),
    /// `slot = { module = "kind", params = {...}, submodules = {...} }`.
    Spec(ModuleSpec),
}

/// An inline module spec (Megatron `ModuleSpec(module, params, submodules)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSpec {
    /// The kind.
    pub module: String,
    /// The kind's parameters, decoded by the kind itself.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub params: toml::Table,
    /// The kind's own submodule slots (none of the built-in kinds has any).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub submodules: BTreeMap<String, SlotSpec>,
}

impl SlotSpec {
    fn module(&self) -> &str {
        match self {
            Self::Kind(k) => k,
            Self::Spec(s) => &s.module,
        }
    }
}

impl<'de> Deserialize<'de> for SlotSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(Self::Kind(s)),
            v @ toml::Value::Table(_) => ModuleSpec::deserialize(v)
                .map(Self::Spec)
                .map_err(|e| D::Error::custom(e.message())),
            other => Err(D::Error::custom(format!(
                "a submodule slot is a kind name or a table {{ module = ... }}, got {} {other}",
                other.type_str()
            ))),
        }
    }
}

impl Serialize for SlotSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Kind(k) => s.serialize_str(k),
            Self::Spec(spec) => spec.serialize(s),
        }
    }
}

/// The two attention modules (a closed set: their slot lists are Megatron's dataclasses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionModule {
    /// Megatron `SelfAttention`.
    SelfAttention,
    /// Megatron `CrossAttention`.
    CrossAttention,
}

impl AttentionModule {
    /// The kind name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SelfAttention => "self-attention",
            Self::CrossAttention => "cross-attention",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "self-attention" | "SelfAttention" => Some(Self::SelfAttention),
            "cross-attention" | "CrossAttention" => Some(Self::CrossAttention),
            _ => None,
        }
    }

    /// Slot names and roles (`SelfAttentionSubmodules` / `CrossAttentionSubmodules`);
    /// the bool says whether the slot is required.
    pub fn slots(self) -> &'static [(&'static str, Role, bool)] {
        match self {
            Self::SelfAttention => &[
                ("linear_qkv", Role::ColumnParallelLinear, true),
                ("core_attention", Role::CoreAttention, true),
                ("linear_proj", Role::RowParallelLinear, true),
                ("q_layernorm", Role::Norm, false),
                ("k_layernorm", Role::Norm, false),
            ],
            Self::CrossAttention => &[
                ("linear_q", Role::ColumnParallelLinear, true),
                ("linear_kv", Role::ColumnParallelLinear, true),
                ("core_attention", Role::CoreAttention, true),
                ("linear_proj", Role::RowParallelLinear, true),
            ],
        }
    }
}

impl fmt::Display for AttentionModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The attention's own parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttentionParams {
    #[serde(default = "default_mask_type")]
    attn_mask_type: AttnMaskType,
}

fn default_mask_type() -> AttnMaskType {
    AttnMaskType::Padding
}

/// The spec a preset expands to.
pub fn preset(name: &str, config: &TransformerConfig) -> Option<AttentionSpec> {
    let kind = |k: &str| SlotSpec::Kind(k.to_string());
    let mask = |m: &str| {
        let mut t = toml::Table::new();
        t.insert("attn_mask_type".into(), toml::Value::String(m.into()));
        t
    };
    match name {
        "gpt-local" => {
            let mut submodules = BTreeMap::from([
                ("linear_qkv".to_string(), kind("column-parallel-linear")),
                ("core_attention".to_string(), kind("dot-product-attention")),
                ("linear_proj".to_string(), kind("row-parallel-linear")),
            ]);
            let qk = if config.qk_l2_norm {
                Some("l2-norm")
            } else if config.qk_layernorm {
                Some("torch-norm")
            } else {
                None
            };
            if let Some(norm) = qk {
                submodules.insert("q_layernorm".into(), kind(norm));
                submodules.insert("k_layernorm".into(), kind(norm));
            }
            Some(AttentionSpec {
                preset: None,
                module: Some("self-attention".into()),
                params: mask("causal"),
                submodules,
            })
        }
        "t5-cross-local" => Some(AttentionSpec {
            preset: None,
            module: Some("cross-attention".into()),
            params: mask("arbitrary"),
            submodules: BTreeMap::from([
                ("linear_q".to_string(), kind("column-parallel-linear")),
                ("linear_kv".to_string(), kind("column-parallel-linear")),
                ("core_attention".to_string(), kind("dot-product-attention")),
                ("linear_proj".to_string(), kind("row-parallel-linear")),
            ]),
        }),
        _ => None,
    }
}

/// A slot resolved to a registered kind.
#[derive(Debug, Clone)]
pub struct ResolvedModule {
    /// The registered factory.
    pub factory: &'static ModuleFactory,
    /// Its parameters.
    pub params: Params,
    /// Where the slot is in the file.
    pub place: Place,
}

impl ResolvedModule {
    /// The canonical kind name.
    pub fn kind(&self) -> &'static str {
        self.factory.kind
    }
}

/// `SelfAttentionSubmodules`, resolved.
#[derive(Debug, Clone)]
pub struct SelfAttentionSubmodules {
    /// Fused QKV projection.
    pub linear_qkv: ResolvedModule,
    /// Core attention.
    pub core_attention: ResolvedModule,
    /// Output projection.
    pub linear_proj: ResolvedModule,
    /// Query norm; `None` is the identity.
    pub q_layernorm: Option<ResolvedModule>,
    /// Key norm; `None` is the identity.
    pub k_layernorm: Option<ResolvedModule>,
}

/// `CrossAttentionSubmodules`, resolved.
#[derive(Debug, Clone)]
pub struct CrossAttentionSubmodules {
    /// Query projection.
    pub linear_q: ResolvedModule,
    /// Fused key/value projection.
    pub linear_kv: ResolvedModule,
    /// Core attention.
    pub core_attention: ResolvedModule,
    /// Output projection.
    pub linear_proj: ResolvedModule,
}

/// The submodules of a resolved attention.
#[derive(Debug, Clone)]
pub enum AttentionSubmodules {
    /// Self attention's slots.
    SelfAttention(SelfAttentionSubmodules),
    /// Cross attention's slots.
    CrossAttention(CrossAttentionSubmodules),
}

/// An attention spec checked against the registry and the config, ready to build.
#[derive(Debug, Clone)]
pub struct ResolvedAttention {
    /// The mask type the attention is built with.
    pub attn_mask_type: AttnMaskType,
    /// The slots.
    pub submodules: AttentionSubmodules,
    /// Where the spec is in the file.
    pub place: Place,
}

impl ResolvedAttention {
    /// Which attention module.
    pub fn module(&self) -> AttentionModule {
        match self.submodules {
            AttentionSubmodules::SelfAttention(_) => AttentionModule::SelfAttention,
            AttentionSubmodules::CrossAttention(_) => AttentionModule::CrossAttention,
        }
    }

    /// Every slot with its module, in Megatron's declaration order.
    pub fn slots(&self) -> Vec<(&'static str, &ResolvedModule)> {
        match &self.submodules {
            AttentionSubmodules::SelfAttention(s) => {
                let mut v = vec![
                    ("linear_qkv", &s.linear_qkv),
                    ("core_attention", &s.core_attention),
                    ("linear_proj", &s.linear_proj),
                ];
                if let Some(q) = &s.q_layernorm {
                    v.push(("q_layernorm", q));
                }
                if let Some(k) = &s.k_layernorm {
                    v.push(("k_layernorm", k));
                }
                v
            }
            AttentionSubmodules::CrossAttention(c) => vec![
                ("linear_q", &c.linear_q),
                ("linear_kv", &c.linear_kv),
                ("core_attention", &c.core_attention),
                ("linear_proj", &c.linear_proj),
            ],
        }
    }
}

impl AttentionSpec {
    /// A spec that is just a preset.
    pub fn preset(name: &str) -> Self {
        Self { preset: Some(name.to_string()), ..Self::default() }
    }

    /// Expands the preset (if any) and overlays this spec's module, params and slots on it.
    fn expand(&self, config: &TransformerConfig, place: &Place) -> Result<AttentionSpec> {
        let Some(name) = &self.preset else { return Ok(self.clone()) };
        let mut base = preset(name, config).ok_or_else(|| SpecError::UnknownPreset {
            place: place.key("preset"),
            name: name.clone(),
            known: Names(PRESETS.iter().map(|p| p.to_string()).collect()),
        })?;
        if let Some(module) = &self.module {
            let same = AttentionModule::parse(module)
                == base.module.as_deref().and_then(AttentionModule::parse);
            if !same {
                return Err(SpecError::Incompatible {
                    place: place.key("module"),
                    reason: format!(
                        "module \"{module}\" contradicts preset \"{name}\", which is a {}",
                        base.module.as_deref().unwrap_or("?")
                    ),
                });
            }
        }
        for (k, v) in &self.params {
            base.params.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.submodules {
            base.submodules.insert(k.clone(), v.clone());
        }
        Ok(base)
    }

    /// Checks the spec against `registry` and `config`: kinds exist and fit their slots, the
    /// params of the attention decode, Megatron's Q/K-norm and cross-attention rules hold.
    /// `place` is where the spec sits in its file, for error messages.
    pub fn resolve(
        &self,
        config: &TransformerConfig,
        registry: &Registry,
        place: &Place,
    ) -> Result<ResolvedAttention> {
        let spec = self.expand(config, place)?;
        let module_name = spec
            .module
            .as_deref()
            .ok_or(SpecError::MissingField { place: place.clone(), field: "module" })?;
        let module = AttentionModule::parse(module_name).ok_or_else(|| SpecError::UnknownKind {
            place: place.key("module"),
            kind: module_name.to_string(),
            known: Names(vec!["self-attention".into(), "cross-attention".into()]),
        })?;
        let params: AttentionParams =
            Params { table: spec.params.clone(), place: place.clone() }.decode(module.name())?;

        let subs_place = place.key("submodules");
        let slot_names = module.slots();
        for name in spec.submodules.keys() {
            if !slot_names.iter().any(|(s, _, _)| s == name) {
                return Err(SpecError::UnknownSlot {
                    place: subs_place.key(name),
                    module: module.name().to_string(),
                    slot: name.clone(),
                    known: Names(slot_names.iter().map(|(s, _, _)| s.to_string()).collect()),
                });
            }
        }
        let mut resolved: BTreeMap<&'static str, ResolvedModule> = BTreeMap::new();
        for &(slot, role, required) in slot_names {
            let slot_place = subs_place.key(slot);
            match spec.submodules.get(slot) {
                Some(s) => {
                    resolved.insert(slot, resolve_slot(s, slot, role, registry, &slot_place)?);
                }
                None if required => {
                    return Err(SpecError::MissingSlot {
                        place: subs_place.clone(),
                        module: module.name().to_string(),
                        slot: slot.to_string(),
                    });
                }
                None => {}
            }
        }
        let mut take = |slot: &str| {
            resolved.remove(slot).ok_or_else(|| SpecError::MissingSlot {
                place: subs_place.clone(),
                module: module.name().to_string(),
                slot: slot.to_string(),
            })
        };
        let submodules = match module {
            AttentionModule::SelfAttention => {
                let linear_qkv = take("linear_qkv")?;
                let core_attention = take("core_attention")?;
                let linear_proj = take("linear_proj")?;
                let q = qk_norm(
                    config,
                    take("q_layernorm").ok(),
                    "q_layernorm",
                    registry,
                    &subs_place,
                )?;
                let k = qk_norm(
                    config,
                    take("k_layernorm").ok(),
                    "k_layernorm",
                    registry,
                    &subs_place,
                )?;
                AttentionSubmodules::SelfAttention(SelfAttentionSubmodules {
                    linear_qkv,
                    core_attention,
                    linear_proj,
                    q_layernorm: q,
                    k_layernorm: k,
                })
            }
            AttentionModule::CrossAttention => {
                if config.num_query_groups != config.num_attention_heads {
                    return Err(SpecError::Incompatible {
                        place: place.key("module"),
                        reason: format!(
                            "group query attention is not supported in cross attention \
                             (num_query_groups = {} != num_attention_heads = {}), as in Megatron",
                            config.num_query_groups, config.num_attention_heads
                        ),
                    });
                }
                AttentionSubmodules::CrossAttention(CrossAttentionSubmodules {
                    linear_q: take("linear_q")?,
                    linear_kv: take("linear_kv")?,
                    core_attention: take("core_attention")?,
                    linear_proj: take("linear_proj")?,
                })
            }
        };
        Ok(ResolvedAttention {
            attn_mask_type: params.attn_mask_type,
            submodules,
            place: place.clone(),
        })
    }
}

fn resolve_slot(
    slot_spec: &SlotSpec,
    slot: &str,
    role: Role,
    registry: &Registry,
    place: &Place,
) -> Result<ResolvedModule> {
    let kind_place = match slot_spec {
        SlotSpec::Kind(_) => place.clone(),
        SlotSpec::Spec(_) => place.key("module"),
    };
    let factory = registry.lookup(slot_spec.module(), &kind_place)?;
    if factory.role() != role {
        return Err(SpecError::WrongRole {
            place: kind_place,
            slot: slot.to_string(),
            kind: slot_spec.module().to_string(),
            expected: role,
            got: factory.role(),
        });
    }
    let (table, subs) = match slot_spec {
        SlotSpec::Kind(_) => (toml::Table::new(), None),
        SlotSpec::Spec(s) => (s.params.clone(), Some(&s.submodules)),
    };
    // No built-in kind has submodule slots of its own; any given one is unknown.
    if let Some(name) = subs.and_then(|s| s.keys().next()) {
        return Err(SpecError::UnknownSlot {
            place: place.key("submodules").key(name),
            module: factory.kind.to_string(),
            slot: name.clone(),
            known: Names(Vec::new()),
        });
    }
    Ok(ResolvedModule {
        factory,
        params: Params { table, place: place.clone() },
        place: place.clone(),
    })
}

/// Megatron's Q/K-norm resolution (`SelfAttention.__init__`).
fn qk_norm(
    config: &TransformerConfig,
    given: Option<ResolvedModule>,
    slot: &str,
    registry: &Registry,
    subs_place: &Place,
) -> Result<Option<ResolvedModule>> {
    let default_kind = if config.qk_l2_norm {
        Some("l2-norm")
    } else if config.qk_layernorm {
        Some("torch-norm")
    } else {
        None
    };
    match (given, default_kind) {
        (Some(m), Some(_)) => Ok(Some(m)),
        (None, Some(kind)) => {
            let place = subs_place.key(slot);
            let factory = registry.lookup(kind, &place)?;
            Ok(Some(ResolvedModule {
                factory,
                params: Params { table: toml::Table::new(), place: place.clone() },
                place,
            }))
        }
        (Some(m), None) if m.kind() == "identity" => Ok(None),
        (Some(m), None) => Err(SpecError::Incompatible {
            place: m.place.clone(),
            reason: format!(
                "spec sets {slot} = \"{}\" but qk_layernorm and qk_l2_norm are false",
                m.kind()
            ),
        }),
        (None, None) => Ok(None),
    }
}
