//! Model files: every malformed config fails with its specific error and place, the registry
//! keeps typetag's semantics (duplicates name both registrations, unknown kinds list the known
//! ones, Megatron class names are aliases), and valid files round-trip and resolve to
//! Megatron-Core's derived values.

use std::panic::{AssertUnwindSafe, catch_unwind};

use anyhow::{Context, Result, bail, ensure};
use attention_core::{Attention, BUILTIN_KINDS};
use attention_spec::config::{
    Normalization, ParamsDtype, PositionEmbeddingType, RecomputeGranularity,
};
use attention_spec::module::Linear;
use attention_spec::registry::{Builder, LinearArgs, ModuleFactory, NormArgs};
use attention_spec::spec::{AttentionModule, AttentionSubmodules, ResolvedAttention};
use attention_spec::{AttnMaskType, Model, ModelSpec, Registry, Role, SpecError};
use tch::Device;
use tch::nn::VarStore;

// ---------------------------------------------------------------------------------------------
// Malformed configs
// ---------------------------------------------------------------------------------------------

/// When a case's error shows.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// `Model::from_toml_str` fails.
    Resolve,
    /// Resolution succeeds and `Attention::build` of a layer fails (the kind's own checks).
    Build,
}

/// One malformed model file and the error it must give.
struct Case {
    name: &'static str,
    toml: &'static str,
    stage: Stage,
    /// The variant, and its fields where they say something.
    matches: fn(&SpecError) -> bool,
    /// A substring of the error's `Display`.
    message: &'static str,
    /// The key path of the error's place (`""`: the document root).
    path: &'static str,
    /// The 1-based line the error points at; `None` when no part of its path is in the text.
    line: Option<usize>,
}

/// `[transformer]` with the two required sizes (lines 1 to 3).
macro_rules! base {
    ($($rest:literal),* $(,)?) => {
        concat!("[transformer]\n", "hidden_size = 64\n", "num_attention_heads = 4\n", $($rest),*)
    };
}

/// [`base!`] with the `gpt-local` preset and an `[attention.submodules]` header (lines 4 to 6).
macro_rules! gpt {
    ($($rest:literal),* $(,)?) => {
        base!("[attention]\n", "preset = \"gpt-local\"\n", "[attention.submodules]\n", $($rest),*)
    };
}

const CASES: &[Case] = &[
    // --- TOML syntax and schema (decoding) ------------------------------------------------
    Case {
        name: "unknown key in [transformer]",
        toml: base!("num_heads = 4\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown field `num_heads`",
        path: "",
        line: Some(4),
    },
    Case {
        name: "unknown top-level table",
        toml: base!("[model]\n", "name = \"gpt\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown field `model`",
        path: "",
        line: Some(4),
    },
    Case {
        name: "string for hidden_size",
        toml: "[transformer]\nhidden_size = \"64\"\nnum_attention_heads = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "invalid type: string \"64\"",
        path: "",
        line: Some(2),
    },
    Case {
        name: "float for num_attention_heads",
        toml: "[transformer]\nhidden_size = 64\nnum_attention_heads = 4.5\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "invalid type: floating point `4.5`",
        path: "",
        line: Some(3),
    },
    Case {
        name: "toml syntax error",
        toml: "[transformer]\nhidden_size = 64\nnum_attention_heads = = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "line 3, column",
        path: "",
        line: Some(3),
    },
    Case {
        name: "non-ascii digits",
        toml: "[transformer]\nhidden_size = \u{ff16}\u{ff14}\nnum_attention_heads = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "line 2, column 15",
        path: "",
        line: Some(2),
    },
    Case {
        name: "key given twice",
        toml: base!("hidden_size = 128\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "duplicate key",
        path: "",
        line: Some(4),
    },
    Case {
        name: "unknown normalization",
        toml: base!("normalization = \"BatchNorm\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown variant `BatchNorm`",
        path: "",
        line: Some(4),
    },
    Case {
        name: "unknown params_dtype",
        toml: base!("params_dtype = \"int8\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown variant `int8`",
        path: "",
        line: Some(4),
    },
    Case {
        name: "recompute_granularity partial",
        toml: base!("recompute_granularity = \"partial\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown variant `partial`, expected `full` or `selective`",
        path: "",
        line: Some(4),
    },
    Case {
        name: "unknown position_embedding_type",
        toml: base!("position_embedding_type = \"alibi\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown variant `alibi`",
        path: "",
        line: Some(4),
    },
    Case {
        name: "unknown key in [attention]",
        toml: base!("[attention]\n", "presets = \"gpt-local\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown field `presets`",
        path: "",
        line: Some(5),
    },
    Case {
        name: "unknown key in [[layers]]",
        toml: base!("[[layers]]\n", "layer_num = 1\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown field `layer_num`",
        path: "",
        line: Some(5),
    },
    Case {
        name: "inline slot table with an unknown key",
        toml: gpt!("core_attention = { module = \"sdpa\", parms = {} }\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "unknown field `parms`",
        path: "",
        line: Some(7),
    },
    Case {
        name: "inline slot table without module",
        toml: gpt!("core_attention = { params = {} }\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "missing field `module`",
        path: "",
        line: Some(7),
    },
    Case {
        name: "slot given as an integer",
        toml: gpt!("core_attention = 3\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Toml { .. }),
        message: "a submodule slot is a kind name or a table { module = ... }, got integer 3",
        path: "",
        line: Some(7),
    },
    // --- [transformer] values ----------------------------------------------------------------
    Case {
        name: "missing [transformer]",
        toml: "[attention]\npreset = \"gpt-local\"\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::MissingField { field: "transformer", .. }),
        message: "missing required field `transformer`",
        path: "",
        line: None,
    },
    Case {
        name: "missing hidden_size",
        toml: "[transformer]\nnum_attention_heads = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::MissingField { field: "hidden_size", .. }),
        message: "missing required field `hidden_size`",
        path: "transformer",
        line: Some(1),
    },
    Case {
        name: "missing num_attention_heads",
        toml: "# a comment\n[transformer]\nhidden_size = 64\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::MissingField { field: "num_attention_heads", .. }),
        message: "missing required field `num_attention_heads`",
        path: "transformer",
        line: Some(2),
    },
    Case {
        name: "zero hidden_size",
        toml: "[transformer]\nhidden_size = 0\nnum_attention_heads = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "hidden_size", value, .. } if value == "0"),
        message: "invalid value 0 for `hidden_size`: must be a positive integer",
        path: "transformer.hidden_size",
        line: Some(2),
    },
    Case {
        name: "negative num_attention_heads",
        toml: "[transformer]\nhidden_size = 64\nnum_attention_heads = -4\n",
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::InvalidValue { field: "num_attention_heads", value, .. }
                if value == "-4")
        },
        message: "invalid value -4 for `num_attention_heads`",
        path: "transformer.num_attention_heads",
        line: Some(3),
    },
    Case {
        name: "zero kv_channels",
        toml: base!("kv_channels = 0\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "kv_channels", .. }),
        message: "invalid value 0 for `kv_channels`",
        path: "transformer.kv_channels",
        line: Some(4),
    },
    Case {
        name: "zero num_layers",
        toml: base!("num_layers = 0\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "num_layers", .. }),
        message: "invalid value 0 for `num_layers`",
        path: "transformer.num_layers",
        line: Some(4),
    },
    Case {
        name: "zero tensor_model_parallel_size",
        toml: base!("tensor_model_parallel_size = 0\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::InvalidValue { field: "tensor_model_parallel_size", .. })
        },
        message: "invalid value 0 for `tensor_model_parallel_size`",
        path: "transformer.tensor_model_parallel_size",
        line: Some(4),
    },
    Case {
        name: "heads not divisible by num_query_groups",
        toml: base!("num_query_groups = 3\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "num_attention_heads (4) must be a multiple of num_query_groups (3)",
        path: "transformer.num_query_groups",
        line: Some(4),
    },
    Case {
        name: "num_query_groups neither multiple nor divisor of tp",
        toml: "[transformer]\nhidden_size = 96\nnum_attention_heads = 12\nnum_query_groups = 3\n\
               tensor_model_parallel_size = 2\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "num_query_groups (3) must be a multiple or divisor of \
                  tensor_model_parallel_size (2)",
        path: "transformer.num_query_groups",
        line: Some(4),
    },
    Case {
        name: "heads not a multiple of tp",
        toml: "[transformer]\nhidden_size = 96\nnum_attention_heads = 6\n\
               tensor_model_parallel_size = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "num_attention_heads (6) must be a multiple of tensor_model_parallel_size (4)",
        path: "transformer.tensor_model_parallel_size",
        line: Some(4),
    },
    Case {
        // Megatron checks heads against tp before anything about groups: with both wrong, the
        // tp error is the one reported.
        name: "heads vs tp reported before heads vs groups",
        toml: "[transformer]\nhidden_size = 96\nnum_attention_heads = 6\nnum_query_groups = 4\n\
               tensor_model_parallel_size = 4\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "num_attention_heads (6) must be a multiple of tensor_model_parallel_size (4)",
        path: "transformer.tensor_model_parallel_size",
        line: Some(5),
    },
    Case {
        name: "hidden_size below num_attention_heads without kv_channels",
        toml: "[transformer]\nhidden_size = 4\nnum_attention_heads = 8\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "hidden_size // num_attention_heads = 4 // 8 = 0",
        path: "transformer.num_attention_heads",
        line: Some(3),
    },
    Case {
        name: "attention_dropout 1.0",
        toml: base!("attention_dropout = 1.0\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::InvalidValue { field: "attention_dropout", value, .. }
                if value == "1")
        },
        message: "must be in [0, 1)",
        path: "transformer.attention_dropout",
        line: Some(4),
    },
    Case {
        name: "negative attention_dropout",
        toml: base!("attention_dropout = -0.1\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "attention_dropout", .. }),
        message: "invalid value -0.1 for `attention_dropout`",
        path: "transformer.attention_dropout",
        line: Some(4),
    },
    Case {
        name: "nan attention_dropout",
        toml: base!("attention_dropout = nan\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "attention_dropout", .. }),
        message: "invalid value NaN for `attention_dropout`",
        path: "transformer.attention_dropout",
        line: Some(4),
    },
    Case {
        name: "negative softmax_scale",
        toml: base!("softmax_scale = -0.25\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "softmax_scale", .. }),
        message: "invalid value -0.25 for `softmax_scale`: must be > 0",
        path: "transformer.softmax_scale",
        line: Some(4),
    },
    Case {
        name: "infinite softmax_scale",
        toml: base!("softmax_scale = inf\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "softmax_scale", .. }),
        message: "invalid value inf for `softmax_scale`",
        path: "transformer.softmax_scale",
        line: Some(4),
    },
    Case {
        name: "rotary_percent 0",
        toml: base!("rotary_percent = 0.0\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "rotary_percent", .. }),
        message: "invalid value 0 for `rotary_percent`: must be in (0, 1]",
        path: "transformer.rotary_percent",
        line: Some(4),
    },
    Case {
        name: "rotary_percent above 1",
        toml: base!("rotary_percent = 1.5\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "rotary_percent", .. }),
        message: "invalid value 1.5 for `rotary_percent`",
        path: "transformer.rotary_percent",
        line: Some(4),
    },
    Case {
        name: "rope with an odd rotary dimension",
        toml: base!(
            "kv_channels = 6\n",
            "position_embedding_type = \"rope\"\n",
            "rotary_percent = 0.5\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "int(6 * 0.5) = 3 must be even",
        path: "transformer.rotary_percent",
        line: Some(6),
    },
    Case {
        name: "zero rotary_base",
        toml: base!("rotary_base = 0.0\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "rotary_base", .. }),
        message: "invalid value 0 for `rotary_base`",
        path: "transformer.rotary_base",
        line: Some(4),
    },
    Case {
        name: "negative layernorm_epsilon",
        toml: base!("layernorm_epsilon = -1e-5\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "layernorm_epsilon", .. }),
        message: "invalid value -0.00001 for `layernorm_epsilon`",
        path: "transformer.layernorm_epsilon",
        line: Some(4),
    },
    Case {
        name: "qk_clip_alpha above 1",
        toml: base!("qk_clip_alpha = 1.5\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "qk_clip_alpha", .. }),
        message: "must be in [0, 1]",
        path: "transformer.qk_clip_alpha",
        line: Some(4),
    },
    Case {
        name: "sequence_parallel without tensor parallelism",
        toml: base!("sequence_parallel = true\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "cannot use sequence parallelism without tensor parallelism",
        path: "transformer.sequence_parallel",
        line: Some(4),
    },
    Case {
        name: "fp16 and bf16",
        toml: base!("fp16 = true\n", "bf16 = true\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "only one of fp16 and bf16 may be true",
        path: "transformer.bf16",
        line: Some(5),
    },
    Case {
        name: "selective recompute of an unknown module",
        toml: base!("recompute_granularity = \"selective\"\n", "recompute_modules = [\"attn\"]\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::InvalidValue { field: "recompute_modules", value, .. }
                if value == "\"attn\"")
        },
        message: "allowed modules are core_attn",
        path: "transformer.recompute_modules",
        line: Some(5),
    },
    Case {
        name: "qkv projection size overflowing i64",
        toml: "[transformer]\nhidden_size = 4611686018427387904\nnum_attention_heads = 1\n",
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "= 4611686018427387904 * (1 + 2 * 1) does not fit in a 64-bit integer",
        path: "transformer.kv_channels",
        line: Some(1),
    },
    // --- [attention] specs ---------------------------------------------------------------------
    Case {
        name: "unknown preset",
        toml: base!("[attention]\n", "preset = \"gpt-lokal\"\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::UnknownPreset { name, known, .. }
                if name == "gpt-lokal" && known.0.iter().any(|p| p == "gpt-local"))
        },
        message: "unknown preset \"gpt-lokal\", known: gpt-local, t5-cross-local",
        path: "attention.preset",
        line: Some(5),
    },
    Case {
        name: "unknown attention module",
        toml: base!("[attention]\n", "module = \"flash-attention\"\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::UnknownKind { kind, known, .. }
                if kind == "flash-attention" && known.0 == ["self-attention", "cross-attention"])
        },
        message: "unknown module kind \"flash-attention\"",
        path: "attention.module",
        line: Some(5),
    },
    Case {
        name: "attention without preset or module",
        toml: base!("[attention]\n", "params = { attn_mask_type = \"causal\" }\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::MissingField { field: "module", .. }),
        message: "missing required field `module`",
        path: "attention",
        line: Some(4),
    },
    Case {
        name: "module contradicting its preset",
        toml: base!("[attention]\n", "preset = \"gpt-local\"\n", "module = \"CrossAttention\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "module \"CrossAttention\" contradicts preset \"gpt-local\"",
        path: "attention.module",
        line: Some(6),
    },
    Case {
        name: "unknown submodule slot",
        toml: gpt!("linear_qk = \"column-parallel-linear\"\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::UnknownSlot { slot, module, known, .. }
                if slot == "linear_qk" && module == "self-attention"
                    && known.0.iter().any(|s| s == "linear_qkv"))
        },
        message: "self-attention has no submodule slot `linear_qk`",
        path: "attention.submodules.linear_qk",
        line: Some(7),
    },
    Case {
        name: "cross-attention slot in a self attention",
        toml: gpt!("linear_kv = \"column-parallel-linear\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::UnknownSlot { slot, .. } if slot == "linear_kv"),
        message: "its slots: linear_qkv, core_attention, linear_proj, q_layernorm, k_layernorm",
        path: "attention.submodules.linear_kv",
        line: Some(7),
    },
    Case {
        name: "norm in the core_attention slot",
        toml: gpt!("core_attention = \"rms-norm\"\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::WrongRole { expected: Role::CoreAttention, got: Role::Norm,
                kind, .. } if kind == "rms-norm")
        },
        message: "slot `core_attention` takes a core attention, but \"rms-norm\" is a norm",
        path: "attention.submodules.core_attention",
        line: Some(7),
    },
    Case {
        name: "core attention in the linear_qkv slot",
        toml: gpt!("linear_qkv = { module = \"sdpa\" }\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(
                e,
                SpecError::WrongRole {
                    expected: Role::ColumnParallelLinear,
                    got: Role::CoreAttention,
                    ..
                }
            )
        },
        message: "slot `linear_qkv` takes a column-parallel linear, but \"sdpa\" is a core attention",
        path: "attention.submodules.linear_qkv.module",
        line: Some(7),
    },
    Case {
        name: "column-parallel linear in linear_proj",
        toml: gpt!("linear_proj = \"ColumnParallelLinear\"\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(
                e,
                SpecError::WrongRole {
                    expected: Role::RowParallelLinear,
                    got: Role::ColumnParallelLinear,
                    ..
                }
            )
        },
        message: "but \"ColumnParallelLinear\" is a column-parallel linear",
        path: "attention.submodules.linear_proj",
        line: Some(7),
    },
    Case {
        name: "unknown kind in a slot",
        toml: gpt!("core_attention = \"flsh\"\n"),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::UnknownKind { kind, known, .. }
                if kind == "flsh" && known.0.iter().any(|k| k == "sdpa"))
        },
        message: "unknown module kind \"flsh\", known: ",
        path: "attention.submodules.core_attention",
        line: Some(7),
    },
    Case {
        name: "unknown kind in an inline slot",
        toml: gpt!("q_layernorm = { module = \"BatchNorm\" }\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::UnknownKind { kind, .. } if kind == "BatchNorm"),
        message: "unknown module kind \"BatchNorm\"",
        path: "attention.submodules.q_layernorm.module",
        line: Some(7),
    },
    Case {
        name: "submodules of a kind without slots",
        toml: gpt!(
            "core_attention = { module = \"sdpa\", submodules = { inner = \"identity\" } }\n"
        ),
        stage: Stage::Resolve,
        matches: |e| {
            matches!(e, SpecError::UnknownSlot { module, slot, known, .. }
                if module == "sdpa" && slot == "inner" && known.0.is_empty())
        },
        message: "sdpa has no submodule slot `inner`; its slots: (none)",
        path: "attention.submodules.core_attention.submodules.inner",
        line: Some(7),
    },
    Case {
        name: "attention params with an unknown key",
        toml: base!(
            "[attention]\n",
            "preset = \"gpt-local\"\n",
            "params = { mask = \"causal\" }\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Params { kind, .. } if kind == "self-attention"),
        message: "params of \"self-attention\": unknown field `mask`",
        path: "attention.params",
        line: Some(6),
    },
    Case {
        name: "invalid attn_mask_type",
        toml: base!(
            "[attention]\n",
            "preset = \"gpt-local\"\n",
            "params = { attn_mask_type = \"diagonal\" }\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Params { kind, .. } if kind == "self-attention"),
        message: "unknown variant `diagonal`",
        path: "attention.params",
        line: Some(6),
    },
    Case {
        name: "q_layernorm without qk_layernorm",
        toml: gpt!("q_layernorm = \"rms-norm\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "spec sets q_layernorm = \"rms-norm\" but qk_layernorm and qk_l2_norm are false",
        path: "attention.submodules.q_layernorm",
        line: Some(7),
    },
    Case {
        name: "missing required slot",
        toml: base!(
            "[attention]\n",
            "module = \"self-attention\"\n",
            "submodules = { linear_qkv = \"column-parallel-linear\", core_attention = \"sdpa\" }\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::MissingSlot { slot, .. } if slot == "linear_proj"),
        message: "self-attention needs its submodule slot `linear_proj`",
        path: "attention.submodules",
        line: Some(6),
    },
    Case {
        name: "cross attention with GQA",
        toml: base!("num_query_groups = 2\n", "[attention]\n", "preset = \"t5-cross-local\"\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "group query attention is not supported in cross attention \
                  (num_query_groups = 2 != num_attention_heads = 4)",
        path: "attention.module",
        line: Some(5),
    },
    // --- [[layers]] ----------------------------------------------------------------------------
    Case {
        name: "layer_number 0",
        toml: base!("num_layers = 2\n", "[[layers]]\n", "layer_number = 0\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "layer_number", value, .. } if value == "0"),
        message: "must be in 1..=2 (num_layers)",
        path: "layers[0].layer_number",
        line: Some(6),
    },
    Case {
        name: "layer_number above num_layers",
        toml: base!(
            "num_layers = 2\n",
            "[[layers]]\n",
            "layer_number = 1\n",
            "[[layers]]\n",
            "layer_number = 3\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "layer_number", value, .. } if value == "3"),
        message: "invalid value 3 for `layer_number`: must be in 1..=2 (num_layers)",
        path: "layers[1].layer_number",
        line: Some(8),
    },
    Case {
        name: "more [[layers]] than num_layers",
        toml: base!("num_layers = 1\n", "[[layers]]\n", "[[layers]]\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::InvalidValue { field: "layer_number", value, .. } if value == "2"),
        message: "must be in 1..=1 (num_layers)",
        path: "layers[1].layer_number",
        line: Some(6),
    },
    Case {
        name: "layer_number declared twice",
        toml: base!("[[layers]]\n", "layer_number = 2\n", "[[layers]]\n", "layer_number = 2\n"),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::Incompatible { .. }),
        message: "layer_number 2 is declared twice",
        path: "layers[1].layer_number",
        line: Some(7),
    },
    Case {
        name: "unknown kind in a layer's own attention",
        toml: base!(
            "[[layers]]\n",
            "[[layers]]\n",
            "attention = { preset = \"gpt-local\", submodules = { core_attention = \"flsh\" } }\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::UnknownKind { kind, .. } if kind == "flsh"),
        message: "unknown module kind \"flsh\"",
        path: "layers[1].attention.submodules.core_attention",
        line: Some(6),
    },
    Case {
        // Columns count characters, as the toml crate's own messages do.
        name: "column after non-ascii text",
        toml: base!(
            "[[layers]]\n",
            "attention = { params = { \"\u{e4}\" = 1 }, preset = \"nope\" }\n"
        ),
        stage: Stage::Resolve,
        matches: |e| matches!(e, SpecError::UnknownPreset { name, .. } if name == "nope"),
        message: "line 5, column 37, `layers[0].attention.preset`: unknown preset \"nope\"",
        path: "layers[0].attention.preset",
        line: Some(5),
    },
    // --- Build (the kinds' own checks) -------------------------------------------------------
    Case {
        name: "params of a kind with an unknown key",
        toml: gpt!("core_attention = { module = \"sdpa\", params = { foo = 1 } }\n"),
        stage: Stage::Build,
        matches: |e| matches!(e, SpecError::Params { kind, .. } if kind == "sdpa"),
        message: "params of \"sdpa\": unknown field `foo`",
        path: "attention.submodules.core_attention.params",
        line: Some(7),
    },
    Case {
        name: "params of a norm with an unknown key",
        toml: base!(
            "qk_layernorm = true\n",
            "[attention]\n",
            "preset = \"gpt-local\"\n",
            "[attention.submodules]\n",
            "k_layernorm = { module = \"rms-norm\", params = { eps = 1e-6 } }\n"
        ),
        stage: Stage::Build,
        matches: |e| matches!(e, SpecError::Params { kind, .. } if kind == "rms-norm"),
        message: "params of \"rms-norm\": unknown field `eps`",
        path: "attention.submodules.k_layernorm.params",
        line: Some(8),
    },
    Case {
        name: "tensor parallelism at build",
        toml: base!(
            "tensor_model_parallel_size = 2\n",
            "[attention]\n",
            "preset = \"gpt-local\"\n"
        ),
        stage: Stage::Build,
        matches: |e| matches!(e, SpecError::Unsupported { .. }),
        message: "column-parallel-linear with tensor_model_parallel_size = 2",
        path: "attention.submodules.linear_qkv",
        line: Some(5),
    },
    Case {
        name: "context parallelism at build",
        toml: base!("context_parallel_size = 2\n"),
        stage: Stage::Build,
        matches: |e| matches!(e, SpecError::Unsupported { .. }),
        message: "context parallelism (context_parallel_size = 2) in dot-product-attention",
        path: "attention.submodules.core_attention",
        line: None,
    },
];

/// The error a case gives, at its stage.
fn error_of(case: &Case) -> Result<SpecError> {
    let registry = attention_core::registry()?;
    match (case.stage, Model::from_toml_str(case.toml, registry)) {
        (Stage::Resolve, Err(e)) => Ok(e),
        (Stage::Resolve, Ok(_)) => bail!("resolved, but an error was expected"),
        (Stage::Build, Err(e)) => bail!("resolution failed, but only the build should: {e}"),
        (Stage::Build, Ok(model)) => {
            let vs = VarStore::new(Device::Cpu);
            for layer in &model.layers {
                let built = Attention::build(
                    &vs.root(),
                    &model.config,
                    &layer.attention,
                    layer.layer_number,
                );
                if let Err(e) = built {
                    return Ok(e.locate(case.toml));
                }
            }
            bail!("built, but an error was expected")
        }
    }
}

fn check(case: &Case) -> Result<()> {
    let err = error_of(case)?;
    let shown = err.to_string();
    ensure!((case.matches)(&err), "unexpected error {err:?}");
    ensure!(shown.contains(case.message), "message {shown:?} lacks {:?}", case.message);
    ensure!(!shown.ends_with('.'), "message {shown:?} ends with a period");
    let place = err.place().with_context(|| format!("no place in {err:?}"))?;
    ensure!(
        place.path_string() == case.path,
        "path `{}`, expected `{}` ({shown})",
        place.path_string(),
        case.path
    );
    ensure!(
        place.line_col.map(|(line, _)| line) == case.line,
        "line/column {:?}, expected line {:?} ({shown})",
        place.line_col,
        case.line
    );
    Ok(())
}

#[test]
fn malformed_configs_fail_with_their_specific_error() -> Result<()> {
    ensure!(CASES.len() >= 34, "only {} cases", CASES.len());
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    ensure!(names.len() == CASES.len(), "case names are not unique");
    let mut failed = Vec::new();
    for case in CASES {
        match catch_unwind(AssertUnwindSafe(|| check(case))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("{}: {e:#}", case.name)),
            Err(_) => failed.push(format!("{}: panicked", case.name)),
        }
    }
    if !failed.is_empty() {
        bail!("{} of {} cases failed:\n{}", failed.len(), CASES.len(), failed.join("\n"));
    }
    Ok(())
}

/// Megatron's `WrappedTorchNorm` refuses sequence parallelism. The whole attention stops earlier,
/// at the tensor-parallel linears this build does not have yet, so the norm slot is built alone.
#[test]
fn torch_norm_refuses_sequence_parallel_at_build() -> Result<()> {
    let text = base!(
        "num_query_groups = 2\n",
        "tensor_model_parallel_size = 2\n",
        "sequence_parallel = true\n",
        "qk_layernorm = true\n",
        "[attention]\n",
        "preset = \"gpt-local\"\n"
    );
    let model = Model::from_toml_str(text, attention_core::registry()?)?;
    let layer = &model.layers[0];
    let AttentionSubmodules::SelfAttention(subs) = &layer.attention.submodules else {
        bail!("expected a self attention");
    };
    let q = subs.q_layernorm.as_ref().context("qk_layernorm gives a q_layernorm")?;
    ensure!(q.kind() == "torch-norm", "q_layernorm is {}", q.kind());
    let Builder::Norm(build) = q.factory.builder else { bail!("torch-norm is not a norm") };

    let vs = VarStore::new(Device::Cpu);
    let path = vs.root() / "q_layernorm";
    let args = NormArgs {
        path: &path,
        config: &model.config,
        params: &q.params,
        hidden_size: model.config.kv_channels,
        eps: model.config.layernorm_epsilon,
    };
    let Err(err) = build(&args) else { bail!("torch-norm built with sequence_parallel") };
    let err = err.locate(text);
    ensure!(matches!(err, SpecError::Incompatible { .. }), "unexpected error {err:?}");
    ensure!(err.to_string().contains("does not support sequence_parallel"), "{err}");
    let place = err.place().context("no place")?;
    ensure!(place.path_string() == "attention.submodules.q_layernorm", "{err}");
    ensure!(place.line_col.is_some_and(|(line, _)| line == 8), "{err}");

    // The whole attention: the first slot built, linear_qkv, refuses tensor parallelism.
    let Err(err) =
        Attention::build(&vs.root(), &model.config, &layer.attention, layer.layer_number)
    else {
        bail!("attention built with tensor_model_parallel_size = 2");
    };
    ensure!(matches!(err, SpecError::Unsupported { .. }), "unexpected error {err:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

fn refuse_linear(args: &LinearArgs<'_>) -> Result<Box<dyn Linear>, SpecError> {
    Err(SpecError::Unsupported { place: args.params.place.clone(), what: "test factory".into() })
}

static FIRST: ModuleFactory = ModuleFactory {
    kind: "test-linear",
    aliases: &["TestLinear"],
    summary: "first registration of a test kind",
    registered_in: concat!(module_path!(), "::first"),
    builder: Builder::ColumnParallelLinear(refuse_linear),
};

static SECOND: ModuleFactory = ModuleFactory {
    kind: "test-linear",
    aliases: &[],
    summary: "second registration of the same kind",
    registered_in: concat!(module_path!(), "::second"),
    builder: Builder::RowParallelLinear(refuse_linear),
};

/// A kind whose alias is FIRST's kind name.
static ALIAS_CLASH: ModuleFactory = ModuleFactory {
    kind: "test-other",
    aliases: &["OtherLinear", "test-linear"],
    summary: "an alias that collides with another kind",
    registered_in: concat!(module_path!(), "::alias_clash"),
    builder: Builder::ColumnParallelLinear(refuse_linear),
};

/// A kind named like FIRST's alias.
static KIND_CLASH: ModuleFactory = ModuleFactory {
    kind: "TestLinear",
    aliases: &[],
    summary: "a kind that collides with another kind's alias",
    registered_in: concat!(module_path!(), "::kind_clash"),
    builder: Builder::ColumnParallelLinear(refuse_linear),
};

/// A kind that lists its own name as an alias.
static SELF_CLASH: ModuleFactory = ModuleFactory {
    kind: "test-self",
    aliases: &["test-self"],
    summary: "an alias equal to its own kind",
    registered_in: concat!(module_path!(), "::self_clash"),
    builder: Builder::ColumnParallelLinear(refuse_linear),
};

#[test]
fn every_builtin_kind_is_registered() -> Result<()> {
    let registry = attention_core::registry()?;
    let kinds = registry.kinds();
    for &kind in BUILTIN_KINDS {
        let factory = registry.get(kind).with_context(|| format!("kind {kind} is missing"))?;
        ensure!(factory.kind == kind, "{kind} resolves to {}", factory.kind);
        ensure!(kinds.contains(&kind), "kinds() lacks {kind}");
        ensure!(factory.registered_in.starts_with("attention_core"), "{kind}: {factory:?}");
    }
    let roles = [
        ("column-parallel-linear", Role::ColumnParallelLinear),
        ("row-parallel-linear", Role::RowParallelLinear),
        ("dot-product-attention", Role::CoreAttention),
        ("sdpa", Role::CoreAttention),
        ("torch-norm", Role::Norm),
        ("identity", Role::Norm),
    ];
    for (kind, role) in roles {
        ensure!(registry.get(kind).map(|f| f.role()) == Some(role), "{kind} is not a {role}");
    }
    // The test's own factories are not submitted, so they must not leak into the global map.
    ensure!(registry.get("test-linear").is_none(), "a test factory is in the global registry");
    Ok(())
}

#[test]
fn duplicate_kind_names_both_registrations() -> Result<()> {
    let registry = Registry::empty().with(&FIRST)?;
    let Err(err) = registry.with(&SECOND) else { bail!("a kind was registered twice") };
    let SpecError::DuplicateKind { kind, first, second } = &err else {
        bail!("unexpected error {err:?}");
    };
    ensure!(kind == "test-linear", "{err}");
    ensure!(first.contains("config::first") && first.contains("\"test-linear\""), "{err}");
    ensure!(second.contains("config::second"), "{err}");
    ensure!(err.place().is_none(), "{err:?}");
    ensure!(err.to_string().starts_with("module kind \"test-linear\" registered twice: by "));
    Ok(())
}

#[test]
fn alias_colliding_with_a_kind_is_a_duplicate() -> Result<()> {
    let mut registry = Registry::empty().with(&FIRST)?;
    let err = registry.register(&ALIAS_CLASH).err().context("alias clash accepted")?;
    ensure!(
        matches!(&err, SpecError::DuplicateKind { kind, first, second }
            if kind == "test-linear" && first.contains("::first")
                && second.contains("::alias_clash")),
        "unexpected error {err:?}"
    );
    // A failed registration leaves the registry unchanged (none of its names were taken).
    ensure!(registry.get("test-other").is_none() && registry.get("OtherLinear").is_none());
    ensure!(registry.kinds() == ["test-linear"], "{:?}", registry.kinds());

    let err = registry.register(&KIND_CLASH).err().context("kind clash accepted")?;
    ensure!(
        matches!(&err, SpecError::DuplicateKind { kind, second, .. }
            if kind == "TestLinear" && second.contains("::kind_clash")),
        "unexpected error {err:?}"
    );

    let err = Registry::empty().with(&SELF_CLASH).err().context("self clash accepted")?;
    ensure!(
        matches!(&err, SpecError::DuplicateKind { kind, .. } if kind == "test-self"),
        "unexpected error {err:?}"
    );
    // The alias resolves to its kind, which is listed once.
    ensure!(registry.get("TestLinear").map(|f| f.kind) == Some("test-linear"));
    Ok(())
}

#[test]
fn explicit_registry_lists_only_its_own_kinds() -> Result<()> {
    let global = attention_core::registry()?;
    let mut explicit = Registry::empty();
    for kind in ["row-parallel-linear", "column-parallel-linear", "dot-product-attention"] {
        explicit.register(global.get(kind).with_context(|| format!("{kind} missing"))?)?;
    }
    explicit.register(&FIRST)?;
    let expected =
        ["column-parallel-linear", "dot-product-attention", "row-parallel-linear", "test-linear"];
    ensure!(explicit.kinds() == expected, "{:?}", explicit.kinds());

    // The default spec (gpt-local) needs only these kinds.
    let text = gpt!("core_attention = \"sdpa\"\n");
    let spec = ModelSpec::from_toml_str(base!())?;
    let model = spec.resolve(&explicit)?;
    ensure!(model.layers.len() == 1);

    let err = ModelSpec::from_toml_str(text)?.resolve(&explicit).err().context("sdpa resolved")?;
    let SpecError::UnknownKind { kind, known, place } = &err else {
        bail!("unexpected error {err:?}");
    };
    ensure!(kind == "sdpa", "{err}");
    ensure!(known.0 == explicit.kinds(), "known {known}, registry {:?}", explicit.kinds());
    ensure!(place.path_string() == "attention.submodules.core_attention", "{err}");

    // An empty registry knows nothing, and says so.
    let err = spec.resolve(&Registry::empty()).err().context("resolved without kinds")?;
    ensure!(err.to_string().ends_with("known: (none)"), "{err}");
    Ok(())
}

#[test]
fn megatron_class_names_are_aliases() -> Result<()> {
    let text = base!(
        "qk_layernorm = true\n",
        "[attention]\n",
        "module = \"SelfAttention\"\n",
        "params = { attn_mask_type = \"causal\" }\n",
        "[attention.submodules]\n",
        "linear_qkv = \"ColumnParallelLinear\"\n",
        "core_attention = \"DotProductAttention\"\n",
        "linear_proj = \"RowParallelLinear\"\n",
        "q_layernorm = \"WrappedTorchNorm\"\n",
        "k_layernorm = { module = \"L2Norm\" }\n"
    );
    let model = Model::from_toml_str(text, attention_core::registry()?)?;
    let attention = &model.layers[0].attention;
    ensure!(attention.module() == AttentionModule::SelfAttention);
    ensure!(
        kinds(attention)
            == [
                ("linear_qkv", "column-parallel-linear"),
                ("core_attention", "dot-product-attention"),
                ("linear_proj", "row-parallel-linear"),
                ("q_layernorm", "torch-norm"),
                ("k_layernorm", "l2-norm"),
            ],
        "{:?}",
        kinds(attention)
    );
    let text = gpt!("q_layernorm = \"IdentityOp\"\n");
    let model = Model::from_toml_str(text, attention_core::registry()?)?;
    ensure!(model.layers[0].attention.slots().len() == 3, "identity is Megatron's None");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Valid configs: round trip and derived values
// ---------------------------------------------------------------------------------------------

/// GPT-style multi-head attention with rotary embeddings and layer scaling.
const GPT_MHA: &str = r#"
[transformer]
num_layers = 2
hidden_size = 64
num_attention_heads = 4
attention_dropout = 0.0
apply_query_key_layer_scaling = true
attention_softmax_in_fp32 = false
position_embedding_type = "rope"
rotary_percent = 0.5
rotary_interleaved = true

[attention]
preset = "gpt-local"
"#;

/// GQA with RMSNorm Q/K layernorms, a QKV bias only, bf16 and per-layer specs.
const GQA_RMS: &str = r#"
[transformer]
num_layers = 3
hidden_size = 128
num_attention_heads = 8
num_query_groups = 2
kv_channels = 32
qk_layernorm = true
normalization = "RMSNorm"
layernorm_epsilon = 1e-6
add_bias_linear = false
add_qkv_bias = true
params_dtype = "bf16"
bf16 = true
position_embedding_type = "rope"
rotary_base = 500000.0
seq_len_interpolation_factor = 2.0
recompute_granularity = "full"

[attention]
preset = "gpt-local"
params = { attn_mask_type = "padding_causal" }

[attention.submodules]
core_attention = "sdpa"
q_layernorm = { module = "rms-norm" }
k_layernorm = "RMSNorm"

[[layers]]
layer_number = 1

[[layers]]
layer_number = 3
attention = { preset = "gpt-local", submodules = { core_attention = "dot-product-attention" } }

[[layers]]
layer_number = 2
"#;

/// The cross attention of Megatron's local T5 decoder.
const CROSS: &str = r#"
[transformer]
hidden_size = 48
num_attention_heads = 6
kv_channels = 8
softmax_scale = 0.25
attention_dropout = 0.0

[attention]
preset = "t5-cross-local"

[attention.submodules]
core_attention = "sdpa"
"#;

/// The two required sizes only.
const MINIMAL: &str = "[transformer]\nhidden_size = 64\nnum_attention_heads = 4\n";

/// `(slot, kind)` of every slot, in Megatron's order.
fn kinds(attention: &ResolvedAttention) -> Vec<(&'static str, &'static str)> {
    attention.slots().into_iter().map(|(slot, m)| (slot, m.kind())).collect()
}

#[test]
fn valid_specs_round_trip() -> Result<()> {
    let with_inline_params = base!(
        "[attention]\n",
        "module = \"self-attention\"\n",
        "[attention.submodules]\n",
        "linear_qkv = { module = \"column-parallel-linear\", ",
        "params = { a = [1, 2], b = { c = \"d\" } } }\n",
        "core_attention = \"sdpa\"\n",
        "linear_proj = \"row-parallel-linear\"\n"
    );
    for (name, text) in [
        ("gpt", GPT_MHA),
        ("gqa", GQA_RMS),
        ("cross", CROSS),
        ("minimal", MINIMAL),
        ("inline params", with_inline_params),
    ] {
        let spec = ModelSpec::from_toml_str(text).with_context(|| format!("{name}: parse"))?;
        let written = spec.to_toml_string().with_context(|| format!("{name}: write"))?;
        let again = ModelSpec::from_toml_str(&written)
            .with_context(|| format!("{name}: reparse of\n{written}"))?;
        ensure!(again == spec, "{name}: round trip changed the spec:\n{written}");
        // Writing is deterministic and a fixed point.
        ensure!(again.to_toml_string()? == written, "{name}: second write differs");
    }
    Ok(())
}

#[test]
fn minimal_config_gets_megatron_defaults() -> Result<()> {
    let model = Model::from_toml_str(MINIMAL, attention_core::registry()?)?;
    let c = &model.config;
    ensure!(c.kv_channels == 16, "kv_channels = hidden_size // heads, got {}", c.kv_channels);
    ensure!(c.num_query_groups == 4, "num_query_groups = heads, got {}", c.num_query_groups);
    ensure!(c.num_layers == 1);
    ensure!(c.attention_dropout == 0.1);
    ensure!(c.attention_softmax_in_fp32);
    ensure!(!c.apply_query_key_layer_scaling);
    ensure!(c.add_bias_linear && !c.add_qkv_bias);
    ensure!(c.layernorm_epsilon == 1e-5);
    ensure!(c.rotary_base == 10000.0 && c.rotary_percent == 1.0);
    ensure!(c.seq_len_interpolation_factor.is_none() && c.softmax_scale.is_none());
    ensure!(c.position_embedding_type == PositionEmbeddingType::LearnedAbsolute);
    ensure!(c.normalization == Normalization::LayerNorm);
    ensure!(c.params_dtype == ParamsDtype::Float32);
    ensure!(c.init_method_std == 0.02);
    ensure!(c.qk_clip_threshold == 100.0 && c.qk_clip_alpha == 0.5);
    ensure!(c.recompute_granularity.is_none());
    ensure!(c.recompute_modules == ["core_attn"], "{:?}", c.recompute_modules);
    ensure!(!c.checkpoint_core_attention());
    ensure!(c.tensor_model_parallel_size == 1 && c.context_parallel_size == 1);
    ensure!(!c.sequence_parallel && !c.fp16 && !c.bf16);
    ensure!(c.query_projection_size() == 64 && c.kv_projection_size() == 64);

    // No [attention]: gpt-local, a causal self attention with local modules and no Q/K norms.
    ensure!(model.layers.len() == 1 && model.layers[0].layer_number == 1);
    let attention = &model.layers[0].attention;
    ensure!(attention.module() == AttentionModule::SelfAttention);
    ensure!(attention.attn_mask_type == AttnMaskType::Causal);
    ensure!(
        kinds(attention)
            == [
                ("linear_qkv", "column-parallel-linear"),
                ("core_attention", "dot-product-attention"),
                ("linear_proj", "row-parallel-linear"),
            ],
        "{:?}",
        kinds(attention)
    );
    ensure!(attention.place.path_string() == "attention");

    // The config alone agrees with the model.
    let spec = ModelSpec::from_toml_str(MINIMAL)?;
    let t = spec.transformer.as_ref().context("no [transformer]")?;
    ensure!(t.resolve(&attention_spec::Place::root().key("transformer"), 0)? == *c);
    let mut new = attention_spec::TransformerConfigSpec::new(64, 4);
    ensure!(new == *t, "TransformerConfigSpec::new differs from the minimal file");
    new.num_layers = Some(2);
    ensure!(new.resolve(&attention_spec::Place::root(), 0)?.num_layers == 2);
    Ok(())
}

#[test]
fn gpt_config_resolves_to_derived_values() -> Result<()> {
    let model = Model::from_toml_str(GPT_MHA, attention_core::registry()?)?;
    let c = &model.config;
    ensure!(c.kv_channels == 16 && c.num_query_groups == 4 && c.heads_per_group() == 1);
    ensure!(c.apply_query_key_layer_scaling);
    ensure!(c.attention_softmax_in_fp32, "layer scaling forces the fp32 softmax");
    ensure!(c.attention_dropout == 0.0);
    ensure!(c.position_embedding_type == PositionEmbeddingType::Rope && c.rotary_interleaved);
    ensure!(c.rotary_dim() == 8, "int(16 * 0.5), got {}", c.rotary_dim());
    let numbers: Vec<i64> = model.layers.iter().map(|l| l.layer_number).collect();
    ensure!(numbers == [1, 2], "no [[layers]]: one per num_layers, got {numbers:?}");
    for layer in &model.layers {
        ensure!(layer.attention.attn_mask_type == AttnMaskType::Causal);
        ensure!(kinds(&layer.attention).len() == 3);
    }
    // It builds, and the built attention agrees with the config.
    let vs = VarStore::new(Device::Cpu);
    for layer in &model.layers {
        let path = vs.root() / format!("layer{}", layer.layer_number);
        let attention = Attention::build(&path, c, &layer.attention, layer.layer_number)?;
        ensure!(!attention.is_cross() && attention.config() == c);
    }
    Ok(())
}

#[test]
fn gqa_config_resolves_overrides_and_layers() -> Result<()> {
    let model = Model::from_toml_str(GQA_RMS, attention_core::registry()?)?;
    let c = &model.config;
    ensure!(c.kv_channels == 32, "an explicit kv_channels is kept, got {}", c.kv_channels);
    ensure!(c.num_query_groups == 2 && c.heads_per_group() == 4);
    ensure!(c.query_projection_size() == 256 && c.kv_projection_size() == 64);
    ensure!(c.normalization == Normalization::RMSNorm && c.layernorm_epsilon == 1e-6);
    ensure!(!c.add_bias_linear && c.add_qkv_bias);
    ensure!(c.params_dtype == ParamsDtype::BFloat16 && c.bf16);
    ensure!(c.rotary_base == 500000.0 && c.seq_len_interpolation_factor == Some(2.0));
    ensure!(c.recompute_granularity == Some(RecomputeGranularity::Full));
    ensure!(c.recompute_modules == ["core_attn"] && !c.checkpoint_core_attention());

    let numbers: Vec<i64> = model.layers.iter().map(|l| l.layer_number).collect();
    ensure!(numbers == [1, 3, 2], "layers keep file order, got {numbers:?}");

    // Shared [attention]: the preset, its slots overridden (sdpa, rms-norm) and params merged.
    let shared = &model.layer(1).context("layer 1")?.attention;
    ensure!(shared.attn_mask_type == AttnMaskType::PaddingCausal);
    let expected_shared = [
        ("linear_qkv", "column-parallel-linear"),
        ("core_attention", "sdpa"),
        ("linear_proj", "row-parallel-linear"),
        ("q_layernorm", "rms-norm"),
        ("k_layernorm", "rms-norm"),
    ];
    ensure!(kinds(shared) == expected_shared, "{:?}", kinds(shared));
    ensure!(shared.place.path_string() == "attention");
    let layer2 = &model.layer(2).context("layer 2")?.attention;
    ensure!(kinds(layer2) == expected_shared, "{:?}", kinds(layer2));

    // Layer 3's own attention replaces the shared one whole: the preset's Q/K norms (torch-norm
    // under qk_layernorm) and mask, with its own core attention.
    let own = &model.layer(3).context("layer 3")?.attention;
    ensure!(own.attn_mask_type == AttnMaskType::Causal);
    ensure!(
        kinds(own)
            == [
                ("linear_qkv", "column-parallel-linear"),
                ("core_attention", "dot-product-attention"),
                ("linear_proj", "row-parallel-linear"),
                ("q_layernorm", "torch-norm"),
                ("k_layernorm", "torch-norm"),
            ],
        "{:?}",
        kinds(own)
    );
    ensure!(own.place.path_string() == "layers[1].attention", "{}", own.place);
    Ok(())
}

#[test]
fn qk_norm_flags_choose_the_preset_norms() -> Result<()> {
    let registry = attention_core::registry()?;
    for (flags, norm) in [
        ("qk_layernorm = true\n", Some("torch-norm")),
        ("qk_l2_norm = true\n", Some("l2-norm")),
        ("qk_layernorm = true\nqk_l2_norm = true\n", Some("l2-norm")),
        ("", None),
    ] {
        let text = format!("{MINIMAL}{flags}");
        let model = Model::from_toml_str(&text, registry)?;
        let attention = &model.layers[0].attention;
        let AttentionSubmodules::SelfAttention(s) = &attention.submodules else {
            bail!("{flags:?}: expected a self attention");
        };
        let q = s.q_layernorm.as_ref().map(|m| m.kind());
        let k = s.k_layernorm.as_ref().map(|m| m.kind());
        ensure!(q == norm && k == norm, "{flags:?}: q {q:?}, k {k:?}, expected {norm:?}");
    }
    Ok(())
}

#[test]
fn cross_config_resolves_to_the_t5_preset() -> Result<()> {
    let model = Model::from_toml_str(CROSS, attention_core::registry()?)?;
    let c = &model.config;
    ensure!(c.kv_channels == 8 && c.num_query_groups == 6 && c.softmax_scale == Some(0.25));
    ensure!(c.query_projection_size() == 48);
    let attention = &model.layers[0].attention;
    ensure!(attention.module() == AttentionModule::CrossAttention);
    ensure!(attention.attn_mask_type == AttnMaskType::Arbitrary);
    ensure!(
        kinds(attention)
            == [
                ("linear_q", "column-parallel-linear"),
                ("linear_kv", "column-parallel-linear"),
                ("core_attention", "sdpa"),
                ("linear_proj", "row-parallel-linear"),
            ],
        "{:?}",
        kinds(attention)
    );
    let vs = VarStore::new(Device::Cpu);
    let built = Attention::build(&vs.root(), c, attention, 1)?;
    ensure!(built.is_cross());
    Ok(())
}
