//! Runs Megatron-Core fixtures through the project's own spec machinery and compares every
//! tensor.
//!
//! A case is a directory holding `case.toml` and `tensors.safetensors` (format in
//! `tools/megatron-golden/README.md`). The runner writes a model file for the case (its
//! `[transformer]` table, the `gpt-local` or `t5-cross-local` preset with the case's mask type,
//! optionally another core attention), resolves and builds it through `attention-spec` and
//! `attention-core`, loads `weight.*` by Megatron state-dict name, runs forward and the backward
//! of `sum((output + bias) * grad_output)`, and compares output, bias and every gradient with
//! `|a - e| <= atol + rtol * |e|`. It also checks that the project's `RotaryEmbedding`
//! rebuilds `input.rotary_pos_emb` from the case's settings.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use attention_core::weights::{load_named, read_safetensors};
use attention_core::{Attention, AttentionInput, RotaryEmbedding};
use attention_spec::{AttnMaskType, Model};
use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// `[case]` of a fixture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseTable {
    /// `"self"` or `"cross"`.
    pub attention: String,
    /// Global 1-based layer number.
    pub layer_number: i64,
    /// Mask type the attention is built with.
    pub attn_mask_type: AttnMaskType,
    /// Batch size.
    pub batch: i64,
    /// Query length.
    pub seq_len: i64,
    /// Key/value length.
    pub kv_seq_len: i64,
    /// Rotary fraction, when rotary is used.
    pub rotary_percent: Option<f64>,
    /// Rotary base, when rotary is used.
    pub rotary_base: Option<f64>,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    case: CaseTable,
    transformer: toml::Table,
}

/// How one compared tensor did.
#[derive(Debug, Clone)]
pub struct TensorReport {
    /// The tensor's name in the fixture.
    pub name: String,
    /// Largest `|a - e|`.
    pub max_abs_err: f64,
    /// Largest `|a - e| / (atol + rtol * |e|)`; at most 1 passes.
    pub worst_ratio: f64,
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case directory's name.
    pub name: String,
    /// Every compared tensor (empty when the case could not run).
    pub tensors: Vec<TensorReport>,
    /// Why the case could not run, or what was missing.
    pub error: Option<String>,
}

impl CaseReport {
    /// Whether every tensor is within tolerance and nothing was missing.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.tensors.iter().all(|t| t.worst_ratio <= 1.0)
    }

    /// The tensor with the largest tolerance ratio.
    pub fn worst(&self) -> Option<&TensorReport> {
        self.tensors.iter().max_by(|a, b| a.worst_ratio.total_cmp(&b.worst_ratio))
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.passed() { "ok  " } else { "FAIL" };
        match (&self.error, self.worst()) {
            (Some(e), _) => write!(f, "{status} {}: {e}", self.name),
            (None, Some(w)) => write!(
                f,
                "{status} {}: {} tensors, worst {} (max |err| {:.3e}, {:.3} of tolerance)",
                self.name,
                self.tensors.len(),
                w.name,
                w.max_abs_err,
                w.worst_ratio
            ),
            (None, None) => write!(f, "{status} {}: nothing compared", self.name),
        }
    }
}

/// Every case directory under `paths` (a case directory itself, or any directory holding case
/// directories at any depth), sorted.
pub fn find_cases(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if dir.join("case.toml").is_file() {
            out.push(dir.to_path_buf());
            return Ok(());
        }
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.exists() {
            bail!("{} does not exist", p.display());
        }
        walk(p, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// The model file a case describes.
pub fn case_model_toml(
    case: &CaseTable,
    transformer: &toml::Table,
    core_attention: Option<&str>,
) -> Result<String> {
    let mut t = transformer.clone();
    if let (Some(p), Some(b)) = (case.rotary_percent, case.rotary_base) {
        t.insert("position_embedding_type".into(), "rope".into());
        t.insert("rotary_percent".into(), p.into());
        t.insert("rotary_base".into(), b.into());
    }
    t.insert("num_layers".into(), case.layer_number.into());
    let preset = match case.attention.as_str() {
        "self" => "gpt-local",
        "cross" => "t5-cross-local",
        other => bail!("case.attention must be \"self\" or \"cross\", got {other:?}"),
    };
    let mut attention = toml::Table::new();
    attention.insert("preset".into(), preset.into());
    let mut params = toml::Table::new();
    params.insert("attn_mask_type".into(), case.attn_mask_type.name().into());
    attention.insert("params".into(), params.into());
    if let Some(kind) = core_attention {
        let mut subs = toml::Table::new();
        subs.insert("core_attention".into(), kind.into());
        attention.insert("submodules".into(), subs.into());
    }
    let mut layer = toml::Table::new();
    layer.insert("layer_number".into(), case.layer_number.into());
    let mut doc = toml::Table::new();
    doc.insert("transformer".into(), t.into());
    doc.insert("attention".into(), attention.into());
    doc.insert("layers".into(), toml::Value::Array(vec![layer.into()]));
    Ok(toml::to_string(&doc)?)
}

fn compare(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    atol: f64,
    rtol: f64,
) -> Result<TensorReport> {
    if actual.size() != expected.size() {
        bail!("{name}: shape {:?}, expected {:?}", actual.size(), expected.size());
    }
    let a = actual.to_kind(Kind::Double).to_device(Device::Cpu);
    let e = expected.to_kind(Kind::Double);
    let err = (&a - &e).abs();
    let tol = e.abs() * rtol + atol;
    let max_abs_err = if err.numel() == 0 { 0.0 } else { err.max().double_value(&[]) };
    let worst_ratio = if err.numel() == 0 { 0.0 } else { (&err / &tol).max().double_value(&[]) };
    if worst_ratio.is_nan() {
        bail!("{name}: NaN in the result");
    }
    Ok(TensorReport { name: name.to_string(), max_abs_err, worst_ratio })
}

fn get<'a>(tensors: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    tensors.get(name).with_context(|| format!("fixture has no tensor {name}"))
}

/// Runs one case on `device`, with the spec's core attention or `core_attention`.
pub fn run_case(dir: &Path, core_attention: Option<&str>, device: Device) -> CaseReport {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match run_case_inner(dir, core_attention, device) {
        Ok(tensors) => CaseReport { name, tensors, error: None },
        Err(e) => CaseReport { name, tensors: Vec::new(), error: Some(format!("{e:#}")) },
    }
}

fn run_case_inner(
    dir: &Path,
    core_attention: Option<&str>,
    device: Device,
) -> Result<Vec<TensorReport>> {
    let text = std::fs::read_to_string(dir.join("case.toml"))
        .with_context(|| format!("cannot read {}", dir.join("case.toml").display()))?;
    let file: CaseFile = toml::from_str(&text).context("case.toml")?;
    let case = &file.case;
    let model_toml = case_model_toml(case, &file.transformer, core_attention)?;
    let model = Model::from_toml_str(&model_toml, attention_core::registry()?)
        .with_context(|| format!("resolving the case's model file:\n{model_toml}"))?;
    let layer = model.layer(case.layer_number).context("the case's layer")?;
    let vs = VarStore::new(device);
    let attn = Attention::build(&vs.root(), &model.config, &layer.attention, layer.layer_number)?;
    let tensors = read_safetensors(&dir.join("tensors.safetensors"))?;
    load_named(&vs, &tensors, "weight.", true)?;

    let to_dev = |name: &str| -> Result<Tensor> { Ok(get(&tensors, name)?.to_device(device)) };
    let hidden = to_dev("input.hidden_states")?.set_requires_grad(true);
    let kv = if attn.is_cross() {
        Some(to_dev("input.key_value_states")?.set_requires_grad(true))
    } else {
        None
    };
    let mask = tensors.get("input.attention_mask").map(|t| t.to_device(device));
    let rope = tensors.get("input.rotary_pos_emb").map(|t| t.to_device(device));
    let grad_output = to_dev("input.grad_output")?;
    let (atol, rtol) = (case.atol, case.rtol);
    let mut reports = Vec::new();

    // The project's rotary table must equal the one Megatron handed in.
    if let Some(expected) = tensors.get("input.rotary_pos_emb") {
        let (Some(percent), Some(base)) = (case.rotary_percent, case.rotary_base) else {
            bail!("input.rotary_pos_emb present but case.rotary_percent/rotary_base absent");
        };
        let emb = RotaryEmbedding::new(
            model.config.kv_channels,
            percent,
            model.config.rotary_interleaved,
            None,
            base,
        )
        .forward(case.seq_len, 0, device);
        reports.push(compare("rotary_pos_emb (RotaryEmbedding)", &emb, expected, atol, rtol)?);
    }

    let mut input = AttentionInput::new(&hidden).training(true);
    if let Some(m) = &mask {
        input = input.with_mask(m);
    }
    if let Some(kv) = &kv {
        input = input.with_key_value_states(kv);
    }
    if let Some(r) = &rope {
        input = input.with_rotary(r);
    }
    let out = attn.forward(&input)?;
    reports.push(compare("output", &out.output, get(&tensors, "expected.output")?, atol, rtol)?);
    match (&out.bias, tensors.get("expected.bias")) {
        (Some(b), Some(e)) => reports.push(compare("bias", b, e, atol, rtol)?),
        (None, None) => {}
        (Some(_), None) => bail!("the attention returned a bias, the fixture has none"),
        (None, Some(_)) => bail!("the fixture has expected.bias, the attention returned none"),
    }
    let total = match &out.bias {
        Some(b) => &out.output + b,
        None => out.output.shallow_clone(),
    };
    (total * &grad_output).sum(Kind::Float).backward();

    reports.push(compare(
        "grad.hidden_states",
        &hidden.grad(),
        get(&tensors, "expected.grad.hidden_states")?,
        atol,
        rtol,
    )?);
    if let Some(kv) = &kv {
        reports.push(compare(
            "grad.key_value_states",
            &kv.grad(),
            get(&tensors, "expected.grad.key_value_states")?,
            atol,
            rtol,
        )?);
    }
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for n in names {
        let key = format!("expected.grad.weight.{n}");
        reports.push(compare(
            &format!("grad.weight.{n}"),
            &vars[n].grad(),
            get(&tensors, &key)?,
            atol,
            rtol,
        )?);
    }
    // Every expected tensor must have been compared.
    let compared: usize = tensors.keys().filter(|k| k.starts_with("expected.")).count();
    let ours = reports.iter().filter(|r| !r.name.starts_with("rotary")).count();
    if compared != ours {
        bail!("the fixture has {compared} expected tensors, {ours} were compared");
    }
    Ok(reports)
}
