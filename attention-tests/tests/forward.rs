//! Forward (and input-gradient) behaviour of the attentions, in fp32 on the CPU, with
//! `attention_dropout = 0`:
//!
//! 1. packed THD sequences give, token for token, what each sequence gives alone;
//! 2. the two core-attention kinds (`dot-product-attention`, `sdpa`) agree;
//! 3. bad input returns a typed [`ForwardError`] and never panics;
//! 4. the rotary table and its application;
//! 5. the fused QKV layout.
//!
//! Sizes: `hidden_size = 32`, 4 query heads of `kv_channels = 8`; GQA uses 2 groups, MQA 1.
//! Weights are drawn with `init_method_std = 0.3` so that the scores are far from uniform.

use std::panic::{AssertUnwindSafe, catch_unwind};

use anyhow::{Result, bail, ensure};
use attention_core::attention::QkvTensors;
use attention_core::rotary::apply_rotary_pos_emb;
use attention_core::{Attention, AttentionInput, RotaryEmbedding, RotaryPosEmb, SelfAttention};
use attention_spec::module::{AttnMaskType, CoreAttentionInput, PackedSeqParams};
use attention_spec::{ForwardError, Model, TransformerConfig};
use attention_tests::assert_close;
use tch::{Device, Kind, Tensor, nn};

const H: i64 = 32;
const NH: i64 = 4;
const HN: i64 = 8;
const CPU: Device = Device::Cpu;
const F32: (Kind, Device) = (Kind::Float, Device::Cpu);
const CORES: [&str; 2] = ["dot-product-attention", "sdpa"];
/// fp32 tolerance (absolute and relative) between mathematically equal computations.
const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A model file: `preset` (`gpt-local` or `t5-cross-local`) with `core` in its core-attention
/// slot, built for `mask_type`; `extra` goes into `[transformer]`; `layer` declares the one
/// layer's number (then `extra` must set `num_layers`).
fn model_toml(
    preset: &str,
    core: &str,
    mask_type: &str,
    extra: &str,
    layer: Option<i64>,
) -> String {
    let mut text = format!(
        "[transformer]\nhidden_size = {H}\nnum_attention_heads = {NH}\nattention_dropout = 0.0\n\
         init_method_std = 0.3\n{extra}\n\n[attention]\npreset = \"{preset}\"\n\
         params = {{ attn_mask_type = \"{mask_type}\" }}\n\
         submodules = {{ core_attention = \"{core}\" }}\n"
    );
    if let Some(n) = layer {
        text.push_str(&format!("\n[[layers]]\nlayer_number = {n}\n"));
    }
    text
}

/// A self attention (`gpt-local`).
fn self_toml(core: &str, mask_type: &str, extra: &str) -> String {
    model_toml("gpt-local", core, mask_type, extra, None)
}

/// A cross attention (`t5-cross-local`).
fn cross_toml(core: &str, mask_type: &str, extra: &str) -> String {
    model_toml("t5-cross-local", core, mask_type, extra, None)
}

/// An attention built from a model file, with the store that owns its parameters.
struct Built {
    vs: nn::VarStore,
    attn: Attention,
    config: TransformerConfig,
}

fn build(text: &str) -> Result<Built> {
    let model = Model::from_toml_str(text, attention_core::registry()?)?;
    let vs = nn::VarStore::new(CPU);
    let layer = &model.layers[0];
    let attn = Attention::build(&vs.root(), &model.config, &layer.attention, layer.layer_number)?;
    Ok(Built { vs, attn, config: model.config })
}

/// One attention per core-attention kind, all with the first one's weights; `toml` gives the
/// model file for a kind.
fn build_kinds(toml: impl Fn(&str) -> String) -> Result<Vec<Built>> {
    let mut built = CORES.iter().map(|c| build(&toml(c))).collect::<Result<Vec<_>>>()?;
    let (first, rest) = built.split_at_mut(1);
    for b in rest {
        b.vs.copy(&first[0].vs)?;
    }
    Ok(built)
}

fn self_attention(attn: &Attention) -> Result<&SelfAttention> {
    match attn {
        Attention::SelfAttention(a) => Ok(a),
        Attention::CrossAttention(_) => bail!("expected a self attention"),
    }
}

/// `d sum(out * g) / d leaves`, without touching the parameters' `.grad`.
fn input_grads(out: &Tensor, g: &Tensor, leaves: &[&Tensor]) -> Result<Vec<Tensor>> {
    let loss = out.f_mul(g)?.f_sum(Kind::Float)?;
    Ok(Tensor::f_run_backward(&[loss], leaves, false, false)?)
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, F32)
}

/// A leaf that requires grad.
fn leaf(shape: &[i64]) -> Tensor {
    randn(shape).set_requires_grad(true)
}

/// A random boolean mask (about 30% masked) of `shape`.
fn random_mask(shape: &[i64]) -> Tensor {
    Tensor::rand(shape, F32).lt(0.3)
}

/// Masks every key of `mask[b_idx, 0, row, :]` (a fully masked row).
fn mask_row(mask: &Tensor, b_idx: i64, row: i64) -> Result<()> {
    let mut r = mask.f_narrow(0, b_idx, 1)?.f_narrow(2, row, 1)?;
    let _ = r.f_fill_(1)?;
    Ok(())
}

/// [`assert_close`] with `TOL` relative to the tensor's scale: the absolute tolerance is
/// `TOL * max(1, max |expected|)`, since fp32 rounding grows with the magnitude of the sums (input
/// gradients here reach about 25).
fn assert_close_scaled(actual: &Tensor, expected: &Tensor, label: &str) -> Result<()> {
    let scale = expected.f_abs()?.f_max()?.double_value(&[]).max(1.0);
    assert_close(actual, expected, TOL * scale, TOL, label)
}

/// Runs `f`, which must fail with a [`ForwardError`] without panicking.
fn expect_err<T>(label: &str, f: impl FnOnce() -> Result<T, ForwardError>) -> Result<ForwardError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(_)) => bail!("{label}: accepted"),
        Ok(Err(e)) => Ok(e),
        Err(_) => bail!("{label}: panicked instead of returning a ForwardError"),
    }
}

/// `expect_err`, then checks the error against a pattern.
macro_rules! assert_err {
    ($label:expr, $call:expr, $pat:pat) => {{
        let e = expect_err($label, || $call)?;
        ensure!(matches!(e, $pat), "{}: unexpected error {e:?}", $label);
    }};
}

// ---------------------------------------------------------------------------------------------
// 1. Packed THD sequences
// ---------------------------------------------------------------------------------------------

/// The rotary table of a packed-sequence check.
#[derive(Debug, Clone, Copy)]
enum Rope {
    /// No rotary.
    Off,
    /// `RotaryEmbedding::from_config(..).forward(max_len, 0)`. RoPE scores depend only on
    /// relative positions, so this alone cannot tell whether positions restart.
    Config,
    /// Random angles per position: scores depend on absolute positions, so only restarting at
    /// 0 in every packed sequence matches the separate runs.
    RandomAngles,
}

/// Packs sequences of lengths `[3, 7, 1, 5]` into one `[16, 1, h]` input (GQA, 2 groups) and
/// checks that every token's output and input gradient equal those of its sequence run alone
/// (`[len, 1, h]`, table rows from 0).
fn check_packed(core: &str, mask_type: &str, rope: Rope) -> Result<()> {
    let label = format!("{core}, {mask_type}, {rope:?}");
    let b = build(&self_toml(core, mask_type, "num_query_groups = 2"))?;
    let lens = [3i64, 7, 1, 5];
    let t: i64 = lens.iter().sum();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let emb = match rope {
        Rope::Off => None,
        Rope::Config => Some(RotaryEmbedding::from_config(&b.config).forward(max_len, 0, CPU)),
        Rope::RandomAngles => Some(Tensor::rand([max_len, 1, 1, HN], F32) * 6.0),
    };
    let packed = PackedSeqParams::from_lengths(&lens, CPU);

    let x = leaf(&[t, 1, H]);
    let g = randn(&[t, 1, H]);
    let mut input = AttentionInput::new(&x).with_packed(&packed);
    if let Some(emb) = &emb {
        input = input.with_rotary(emb);
    }
    let out = b.attn.forward(&input)?.output;
    let dx = input_grads(&out, &g, &[&x])?.remove(0);

    let mut start = 0;
    for (i, &len) in lens.iter().enumerate() {
        let xi = x.detach().narrow(0, start, len).copy().set_requires_grad(true);
        let mut input = AttentionInput::new(&xi);
        if let Some(emb) = &emb {
            input = input.with_rotary(emb);
        }
        let out_i = b.attn.forward(&input)?.output;
        let dxi = input_grads(&out_i, &g.narrow(0, start, len), &[&xi])?.remove(0);
        assert_close_scaled(&out.narrow(0, start, len), &out_i, &format!("{label}: seq {i}"))?;
        assert_close_scaled(&dx.narrow(0, start, len), &dxi, &format!("{label}: dx seq {i}"))?;
        start += len;
    }
    Ok(())
}

/// Causal packed sequences equal separate runs, for both kinds, with and without rotary;
/// rotary positions restart at 0 in every sequence.
#[test]
fn packed_causal_matches_separate_sequences() -> Result<()> {
    for core in CORES {
        for rope in [Rope::Off, Rope::Config, Rope::RandomAngles] {
            check_packed(core, "causal", rope)?;
        }
    }
    Ok(())
}

/// Non-causal packed sequences (padding mask type, no mask): full attention inside each
/// sequence and none across boundaries.
#[test]
fn packed_padding_matches_separate_sequences() -> Result<()> {
    for core in CORES {
        for rope in [Rope::Off, Rope::Config, Rope::RandomAngles] {
            check_packed(core, "padding", rope)?;
        }
    }
    Ok(())
}

/// Changing the tokens of the first packed sequence leaves the second one's outputs unchanged
/// (in particular, causal attention does not reach back across the boundary).
#[test]
fn packed_sequences_do_not_see_each_other() -> Result<()> {
    for core in CORES {
        for mask_type in ["causal", "padding"] {
            let b = build(&self_toml(core, mask_type, "num_query_groups = 2"))?;
            let packed = PackedSeqParams::from_lengths(&[4, 6], CPU);
            let x = randn(&[10, 1, H]);
            let y = x.copy();
            let mut head = y.narrow(0, 0, 4);
            head.f_copy_(&randn(&[4, 1, H]))?;
            let ox = b.attn.forward(&AttentionInput::new(&x).with_packed(&packed))?.output;
            let oy = b.attn.forward(&AttentionInput::new(&y).with_packed(&packed))?.output;
            let label = format!("{core}, {mask_type}");
            assert_close(&oy.narrow(0, 4, 6), &ox.narrow(0, 4, 6), 0.0, 0.0, &label)?;
            // Sanity: the first sequence's outputs did change.
            ensure!(
                !oy.narrow(0, 0, 4).allclose(&ox.narrow(0, 0, 4), 1e-3, 1e-3, false),
                "{label}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. dot-product-attention and sdpa agree
// ---------------------------------------------------------------------------------------------

/// Inputs of one agreement case.
struct Case<'a> {
    label: &'a str,
    /// Query length.
    sq: i64,
    /// Batch.
    b: i64,
    /// Key length of a cross attention (`None`: self attention).
    sk: Option<i64>,
    mask: Option<&'a Tensor>,
    bias: Option<&'a Tensor>,
}

/// Runs `case` through one attention per kind (same weights) and compares the outputs and the
/// gradients w.r.t. `hidden_states` (and `key_value_states`, and `attention_bias`).
fn assert_kinds_agree(toml: impl Fn(&str) -> String, case: &Case<'_>) -> Result<()> {
    let built = build_kinds(toml)?;
    let x = leaf(&[case.sq, case.b, H]);
    let kv = case.sk.map(|sk| leaf(&[sk, case.b, H]));
    let bias = case.bias.map(|b| b.detach().copy().set_requires_grad(true));
    let g = randn(&[case.sq, case.b, H]);
    let mut results = Vec::new();
    for (kind, b) in CORES.iter().zip(&built) {
        let mut input = AttentionInput::new(&x);
        let mut leaves = vec![&x];
        if let Some(kv) = &kv {
            input = input.with_key_value_states(kv);
            leaves.push(kv);
        }
        if let Some(m) = case.mask {
            input = input.with_mask(m);
        }
        if let Some(bias) = &bias {
            input = input.with_bias(bias);
            leaves.push(bias);
        }
        let out = b.attn.forward(&input)?.output;
        ensure!(
            out.isfinite().all().int64_value(&[]) == 1,
            "{}: non-finite output from {kind}",
            case.label
        );
        let grads = input_grads(&out, &g, &leaves)?;
        results.push((out, grads));
    }
    let (ref_out, ref_grads) = &results[0];
    for (kind, (out, grads)) in CORES.iter().zip(&results).skip(1) {
        assert_close_scaled(out, ref_out, &format!("{}: {kind} output", case.label))?;
        for (i, (gr, rg)) in grads.iter().zip(ref_grads).enumerate() {
            assert_close_scaled(gr, rg, &format!("{}: {kind} input grad {i}", case.label))?;
        }
    }
    Ok(())
}

fn plain<'a>(label: &'a str, sq: i64, b: i64) -> Case<'a> {
    Case { label, sq, b, sk: None, mask: None, bias: None }
}

/// GQA (2 groups), MQA (1 group) and plain multi-head (4 groups), causal without a mask, for
/// `sq = 6` and for a single query token (which sees every key).
#[test]
fn kinds_agree_gqa_mqa_causal() -> Result<()> {
    for groups in [2, 1, NH] {
        let extra = format!("num_query_groups = {groups}");
        let t = |c: &str| self_toml(c, "causal", &extra);
        assert_kinds_agree(t, &plain(&format!("causal, {groups} groups"), 6, 2))?;
        assert_kinds_agree(t, &plain(&format!("causal sq = 1, {groups} groups"), 1, 2))?;
    }
    Ok(())
}

/// Padding masks `[b, 1, sq, sk]`, `[b, 1, 1, sk]` and `[1, 1, sq, sk]` with fully masked rows,
/// GQA and MQA.
#[test]
fn kinds_agree_padding_masks_with_fully_masked_rows() -> Result<()> {
    let (sq, b) = (5, 2);
    for groups in [2, 1] {
        let extra = format!("num_query_groups = {groups}");
        let t = |c: &str| self_toml(c, "padding", &extra);
        let full = random_mask(&[b, 1, sq, sq]);
        mask_row(&full, 0, 1)?;
        mask_row(&full, 1, 4)?;
        let keys = random_mask(&[b, 1, 1, sq]);
        mask_row(&keys, 1, 0)?; // every query of batch 1 sees no key
        let shared = random_mask(&[1, 1, sq, sq]);
        mask_row(&shared, 0, 2)?;
        for (name, m) in [("[b,1,sq,sk]", &full), ("[b,1,1,sk]", &keys), ("[1,1,sq,sk]", &shared)] {
            let label = format!("padding mask {name}, {groups} groups");
            assert_kinds_agree(t, &Case { mask: Some(m), ..plain(&label, sq, b) })?;
        }
    }
    Ok(())
}

/// A core attention called directly: a fully masked row is the mean of the values over all
/// keys (Megatron's -10000 fill), for both kinds and with GQA; the kinds agree elsewhere.
#[test]
fn fully_masked_rows_average_all_values() -> Result<()> {
    let (sq, sk, b, groups) = (4, 6, 2, 2);
    let p = NH / groups;
    let q = randn(&[sq, b, NH, HN]);
    let k = randn(&[sk, b, groups, HN]);
    let v = randn(&[sk, b, groups, HN]);
    let mask = random_mask(&[b, 1, sq, sk]);
    mask_row(&mask, 0, 1)?;
    mask_row(&mask, 1, 3)?;
    let mut outs = Vec::new();
    for core in CORES {
        let built = build(&self_toml(core, "padding", &format!("num_query_groups = {groups}")))?;
        let core_attention = self_attention(&built.attn)?.core_attention();
        let out = core_attention.forward(&CoreAttentionInput {
            query: &q,
            key: &k,
            value: &v,
            attention_mask: Some(&mask),
            attn_mask_type: AttnMaskType::Padding,
            attention_bias: None,
            packed_seq_params: None,
            training: false,
        })?;
        let heads = out.f_view([sq, b, NH, HN])?;
        for (bi, row) in [(0, 1), (1, 3)] {
            for n in 0..NH {
                let got = heads.get(row).get(bi).get(n);
                let want = v.select(1, bi).select(1, n / p).mean_dim(0, false, Kind::Float);
                assert_close_scaled(
                    &got,
                    &want,
                    &format!("{core}: row {row} batch {bi} head {n}"),
                )?;
            }
        }
        outs.push(out);
    }
    assert_close_scaled(&outs[1], &outs[0], "sdpa vs dot-product-attention")
}

/// An `attention_bias` `[1, 1, sq, sk]` or `[b, nh, sq, sk]`, alone, with a padding mask that
/// has fully masked rows, and with the causal mask type.
#[test]
fn kinds_agree_attention_bias() -> Result<()> {
    let (sq, b) = (5, 2);
    let mask = random_mask(&[b, 1, sq, sq]);
    mask_row(&mask, 1, 2)?;
    for shape in [[1, 1, sq, sq], [b, NH, sq, sq]] {
        let bias = randn(&shape);
        for mask_type in ["padding", "causal"] {
            let t = |c: &str| self_toml(c, mask_type, "num_query_groups = 2");
            let label = format!("bias {shape:?}, {mask_type}");
            assert_kinds_agree(t, &Case { bias: Some(&bias), ..plain(&label, sq, b) })?;
            let label = format!("bias {shape:?} and mask, {mask_type}");
            let case = Case { bias: Some(&bias), mask: Some(&mask), ..plain(&label, sq, b) };
            assert_kinds_agree(t, &case)?;
        }
    }
    Ok(())
}

/// Cross attention with `sq != sk`: no mask, masks `[b, 1, 1, sk]` and `[1, 1, sq, sk]` (with
/// fully masked rows), and a bias.
#[test]
fn kinds_agree_cross_attention() -> Result<()> {
    let (sq, sk, b) = (3, 7, 2);
    let t = |c: &str| cross_toml(c, "arbitrary", "");
    let cross = |label| Case { sk: Some(sk), ..plain(label, sq, b) };
    let keys = random_mask(&[b, 1, 1, sk]);
    mask_row(&keys, 0, 0)?;
    let shared = random_mask(&[1, 1, sq, sk]);
    mask_row(&shared, 0, 1)?;
    let bias = randn(&[b, NH, sq, sk]);
    assert_kinds_agree(t, &cross("cross, no mask"))?;
    assert_kinds_agree(t, &Case { mask: Some(&keys), ..cross("cross, mask [b,1,1,sk]") })?;
    assert_kinds_agree(t, &Case { mask: Some(&shared), ..cross("cross, mask [1,1,sq,sk]") })?;
    assert_kinds_agree(t, &Case { bias: Some(&bias), ..cross("cross, bias") })?;
    let case = Case { bias: Some(&bias), mask: Some(&keys), ..cross("cross, bias and mask") };
    assert_kinds_agree(t, &case)
}

/// `apply_query_key_layer_scaling` at layer 3 and an explicit `softmax_scale`, alone and
/// together, causal and with a padding mask.
#[test]
fn kinds_agree_layer_scaling_and_softmax_scale() -> Result<()> {
    let (sq, b) = (6, 2);
    let mask = random_mask(&[b, 1, sq, sq]);
    mask_row(&mask, 0, 3)?;
    let configs = [
        "num_layers = 4\napply_query_key_layer_scaling = true",
        "num_layers = 4\nsoftmax_scale = 0.3",
        "num_layers = 4\napply_query_key_layer_scaling = true\nsoftmax_scale = 0.2",
    ];
    for extra in configs {
        for mask_type in ["causal", "padding"] {
            let t = |c: &str| model_toml("gpt-local", c, mask_type, extra, Some(3));
            let label = format!("{extra:?}, {mask_type}");
            let m = (mask_type == "padding").then_some(&mask);
            assert_kinds_agree(t, &Case { mask: m, ..plain(&label, sq, b) })?;
        }
    }
    Ok(())
}

/// Layer scaling cancels out: layer 3 with scaling equals layer 3 without it.
#[test]
fn layer_scaling_cancels_out() -> Result<()> {
    for core in CORES {
        let mut with = build(&model_toml(
            "gpt-local",
            core,
            "causal",
            "num_layers = 4\napply_query_key_layer_scaling = true",
            Some(3),
        ))?;
        let without = build(&model_toml("gpt-local", core, "causal", "num_layers = 4", Some(3)))?;
        with.vs.copy(&without.vs)?;
        let x = randn(&[5, 2, H]);
        let a = with.attn.forward(&AttentionInput::new(&x))?.output;
        let b = without.attn.forward(&AttentionInput::new(&x))?.output;
        assert_close_scaled(&a, &b, core)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Bad input
// ---------------------------------------------------------------------------------------------

/// Wrong rank, hidden size or dtype of `hidden_states`, and `key_value_states` given to a self
/// attention: each is a typed error naming the input.
#[test]
fn bad_hidden_states_are_typed_errors() -> Result<()> {
    for core in CORES {
        let b = build(&self_toml(core, "causal", "num_query_groups = 2"))?;
        let a = &b.attn;
        let x = randn(&[4, 2, H]);
        let rank2 = randn(&[4, H]);
        assert_err!(
            "rank 2",
            a.forward(&AttentionInput::new(&rank2)),
            ForwardError::Shape { name: "hidden_states", .. }
        );
        let wide = randn(&[4, 2, H + 1]);
        assert_err!(
            "hidden size",
            a.forward(&AttentionInput::new(&wide)),
            ForwardError::Shape { name: "hidden_states", .. }
        );
        let f64_x = x.to_kind(Kind::Double);
        assert_err!(
            "f64 input",
            a.forward(&AttentionInput::new(&f64_x)),
            ForwardError::Dtype { name: "hidden_states", got: Kind::Double, .. }
        );
        let int_x = Tensor::ones([4, 2, H], (Kind::Int64, CPU));
        assert_err!(
            "integer input",
            a.forward(&AttentionInput::new(&int_x)),
            ForwardError::Dtype { name: "hidden_states", got: Kind::Int64, .. }
        );
        assert_err!(
            "key_value_states to self attention",
            a.forward(&AttentionInput::new(&x).with_key_value_states(&x)),
            ForwardError::Invalid { name: "key_value_states", .. }
        );
        let sa = self_attention(a)?;
        assert_err!(
            "get_query_key_value_tensors, rank 2",
            sa.get_query_key_value_tensors(&rank2, true),
            ForwardError::Shape { name: "hidden_states", .. }
        );
    }
    Ok(())
}

/// Masks that are not bool or not broadcastable to `[b, nh, sq, sk]`, and biases that are not
/// broadcastable.
#[test]
fn bad_masks_and_biases_are_typed_errors() -> Result<()> {
    for core in CORES {
        let b = build(&self_toml(core, "padding", "num_query_groups = 2"))?;
        let a = &b.attn;
        let x = randn(&[4, 2, H]);
        let float_mask = Tensor::zeros([2, 1, 4, 4], F32);
        assert_err!(
            "float mask",
            a.forward(&AttentionInput::new(&x).with_mask(&float_mask)),
            ForwardError::Dtype { name: "attention_mask", .. }
        );
        for shape in [&[3, 1, 4, 4][..], &[2, 1, 4, 5], &[2, 3, 4, 4], &[4, 4], &[2, 1, 1, 4, 4]] {
            let m = Tensor::zeros(shape, (Kind::Bool, CPU));
            assert_err!(
                &format!("mask {shape:?}"),
                a.forward(&AttentionInput::new(&x).with_mask(&m)),
                ForwardError::Shape { name: "attention_mask", .. }
            );
        }
        for shape in [&[1, 1, 4, 5][..], &[2, 2, 4, 4], &[1, 1, 3, 4], &[4, 4]] {
            let bias = randn(shape);
            assert_err!(
                &format!("bias {shape:?}"),
                a.forward(&AttentionInput::new(&x).with_bias(&bias)),
                ForwardError::Shape { name: "attention_bias", .. }
            );
        }
        let int_bias = Tensor::zeros([1, 1, 4, 4], (Kind::Int64, CPU));
        assert_err!(
            "integer bias",
            a.forward(&AttentionInput::new(&x).with_bias(&int_bias)),
            ForwardError::Dtype { name: "attention_bias", .. }
        );
    }
    Ok(())
}

/// Rotary tables shorter than `sq`, with an odd last dimension, with a last dimension above
/// `kv_channels`, of the wrong rank, or of an integer dtype.
#[test]
fn bad_rotary_tables_are_typed_errors() -> Result<()> {
    for core in CORES {
        let b = build(&self_toml(core, "causal", "num_query_groups = 2"))?;
        let a = &b.attn;
        let x = randn(&[4, 2, H]);
        for shape in
            [&[3, 1, 1, HN][..], &[4, 1, 1, 7], &[4, 1, 1, HN + 2], &[4, HN], &[4, 1, 1, 0]]
        {
            let emb = randn(shape);
            assert_err!(
                &format!("rotary {shape:?}"),
                a.forward(&AttentionInput::new(&x).with_rotary(&emb)),
                ForwardError::Shape { name: "rotary_pos_emb (query)", .. }
            );
        }
        let int_emb = Tensor::zeros([4, 1, 1, HN], (Kind::Int64, CPU));
        assert_err!(
            "integer rotary",
            a.forward(&AttentionInput::new(&x).with_rotary(&int_emb)),
            ForwardError::Dtype { .. }
        );
    }
    Ok(())
}

/// Cross attention without `key_value_states`, with a different batch in them, or built with
/// the causal mask type and called with `sq != sk` and no mask.
#[test]
fn bad_cross_attention_input_is_a_typed_error() -> Result<()> {
    for core in CORES {
        let b = build(&cross_toml(core, "arbitrary", ""))?;
        let a = &b.attn;
        let x = randn(&[3, 2, H]);
        assert_err!(
            "missing key_value_states",
            a.forward(&AttentionInput::new(&x)),
            ForwardError::Invalid { name: "key_value_states", .. }
        );
        let kv_batch = randn(&[5, 3, H]);
        assert_err!(
            "key_value_states batch",
            a.forward(&AttentionInput::new(&x).with_key_value_states(&kv_batch)),
            ForwardError::Shape { name: "key_value_states", .. }
        );
        let kv_wide = randn(&[5, 2, H + 1]);
        assert_err!(
            "key_value_states hidden size",
            a.forward(&AttentionInput::new(&x).with_key_value_states(&kv_wide)),
            ForwardError::Shape { name: "key_value_states", .. }
        );

        let causal = build(&cross_toml(core, "causal", ""))?;
        let kv = randn(&[5, 2, H]);
        assert_err!(
            "causal with sq != sk",
            causal.attn.forward(&AttentionInput::new(&x).with_key_value_states(&kv)),
            ForwardError::Invalid { name: "attn_mask_type", .. }
        );
        // The same call with an explicit mask, or with sq == sk, is fine.
        let mask = Tensor::zeros([1, 1, 3, 5], (Kind::Bool, CPU));
        causal
            .attn
            .forward(&AttentionInput::new(&x).with_key_value_states(&kv).with_mask(&mask))?;
        let kv3 = randn(&[3, 2, H]);
        causal.attn.forward(&AttentionInput::new(&x).with_key_value_states(&kv3))?;
    }
    Ok(())
}

/// Packed sequences with batch > 1, float `cu_seqlens`, or a rotary table shorter than the
/// longest packed sequence (positions restart in every sequence, so the table must cover
/// `max_seqlen`, not the total length).
#[test]
fn bad_packed_params_are_typed_errors() -> Result<()> {
    for core in CORES {
        let b = build(&self_toml(core, "causal", "num_query_groups = 2"))?;
        let a = &b.attn;
        let packed = PackedSeqParams::from_lengths(&[2, 3], CPU);
        let x2 = randn(&[5, 2, H]);
        assert_err!(
            "packed with batch 2",
            a.forward(&AttentionInput::new(&x2).with_packed(&packed)),
            ForwardError::Invalid { name: "packed_seq_params", .. }
        );
        let x = randn(&[5, 1, H]);
        let rope = RotaryEmbedding::from_config(&b.config);
        let short = rope.forward(2, 0, CPU);
        assert_err!(
            "packed rotary table shorter than max_seqlen",
            a.forward(&AttentionInput::new(&x).with_packed(&packed).with_rotary(&short)),
            ForwardError::Shape { name: "rotary_pos_emb (query)", .. }
        );
        let enough = rope.forward(3, 0, CPU);
        a.forward(&AttentionInput::new(&x).with_packed(&packed).with_rotary(&enough))?;
        let cu = Tensor::from_slice(&[0.0f32, 2.0, 5.0]);
        let float_cu = PackedSeqParams {
            cu_seqlens_q: cu.shallow_clone(),
            cu_seqlens_kv: cu,
            max_seqlen_q: 3,
            max_seqlen_kv: 3,
        };
        assert_err!(
            "float cu_seqlens",
            a.forward(&AttentionInput::new(&x).with_packed(&float_cu)),
            ForwardError::Dtype { name: "cu_seqlens_q", .. }
        );
    }
    Ok(())
}

/// A core attention called directly with key and value of different shapes, or with query
/// heads that are not a multiple of the key/value heads.
#[test]
fn bad_core_attention_input_is_a_typed_error() -> Result<()> {
    for core in CORES {
        let built = build(&self_toml(core, "causal", "num_query_groups = 2"))?;
        let Attention::SelfAttention(a) = &built.attn else { bail!("expected a self attention") };
        let ca = a.core_attention();
        let call = |q: &Tensor, k: &Tensor, v: &Tensor| {
            ca.forward(&CoreAttentionInput::new(q, k, v, AttnMaskType::Causal))
        };
        let q = randn(&[4, 2, NH, HN]);
        let k = randn(&[4, 2, 2, HN]);
        let v_short = randn(&[3, 2, 2, HN]);
        assert_err!(
            "value length",
            call(&q, &k, &v_short),
            ForwardError::Shape { name: "value", .. }
        );
        let v_heads = randn(&[4, 2, 1, HN]);
        assert_err!(
            "value heads",
            call(&q, &k, &v_heads),
            ForwardError::Shape { name: "value", .. }
        );
        let k3 = randn(&[4, 2, 3, HN]);
        assert_err!(
            "4 heads over 3 groups",
            call(&q, &k3, &k3),
            ForwardError::Invalid { name: "key", .. }
        );
        let k_hn = randn(&[4, 2, 2, HN + 1]);
        assert_err!(
            "key head dim",
            call(&q, &k_hn, &k_hn),
            ForwardError::Shape { name: "key", .. }
        );
        let q3 = randn(&[4, 2, NH * HN]);
        assert_err!("query rank 3", call(&q3, &k, &k), ForwardError::Shape { name: "query", .. });
        let k64 = k.to_kind(Kind::Double);
        assert_err!("key dtype", call(&q, &k64, &k64), ForwardError::Dtype { name: "key", .. });
    }
    Ok(())
}

/// `SdpaAttention::plain_call` (what `sdpa-cuda` runs its own way) names exactly the SDPA call
/// the forward makes: that call on the permuted inputs is the forward's output bit for bit;
/// calls the forward makes otherwise (a mask, a bias, training with max-logit tracking) get
/// `None`, and input the forward rejects gets the forward's error.
#[test]
fn sdpa_plain_call_is_the_forward() -> Result<()> {
    use anyhow::Context;
    use attention_core::sdpa::SdpaAttention;
    use attention_spec::module::AttentionType;
    use attention_spec::module::CoreAttention;
    use attention_spec::registry::{CoreAttentionArgs, Params};
    for (mask_type, extra) in [
        (AttnMaskType::Causal, "num_query_groups = 2"),
        (AttnMaskType::NoMask, "num_query_groups = 4\nsoftmax_scale = 0.25"),
        (AttnMaskType::Causal, "num_query_groups = 2\nqk_clip = true"),
    ] {
        let model =
            Model::from_toml_str(&self_toml("sdpa", "causal", extra), attention_core::registry()?)?;
        let vs = nn::VarStore::new(CPU);
        let params = Params { table: toml::Table::new(), place: attention_spec::Place::root() };
        let sdpa = SdpaAttention::new(&CoreAttentionArgs {
            path: &vs.root(),
            config: &model.config,
            params: &params,
            layer_number: 1,
            attn_mask_type: mask_type,
            attention_type: AttentionType::SelfAttention,
        })?;
        let ng = model.config.num_query_groups;
        for sq in [5i64, 1] {
            let (q, k, v) =
                (randn(&[sq, 2, NH, HN]), randn(&[sq, 2, ng, HN]), randn(&[sq, 2, ng, HN]));
            let input = CoreAttentionInput::new(&q, &k, &v, mask_type);
            let call = sdpa.plain_call(&input)?.context("a plain call")?;
            ensure!(call.causal == (mask_type == AttnMaskType::Causal && sq > 1), "causal flag");
            ensure!(call.gqa == (ng != NH) && call.dropout == 0.0, "gqa, dropout");
            let [qp, kp, vp] = [&q, &k, &v].map(|t| t.permute([1, 2, 0, 3]));
            let out = Tensor::scaled_dot_product_attention(
                &qp,
                &kp,
                &vp,
                None::<Tensor>,
                call.dropout,
                call.causal,
                call.scale,
                call.gqa,
            );
            let out = out.permute([2, 0, 1, 3]).contiguous().view([sq, 2, NH * HN]);
            ensure!(
                out.equal(&sdpa.forward(&input)?),
                "plain call != forward ({mask_type:?}, sq {sq})"
            );
            // Training: a plain call unless max logits are tracked.
            let training = CoreAttentionInput { training: true, ..input };
            ensure!(
                sdpa.plain_call(&training)?.is_some() != model.config.qk_clip,
                "training with qk_clip = {}",
                model.config.qk_clip
            );
            let mask = Tensor::zeros([2, 1, sq, sq], (Kind::Bool, CPU));
            let masked = CoreAttentionInput { attention_mask: Some(&mask), ..input };
            ensure!(sdpa.plain_call(&masked)?.is_none(), "a mask");
        }
        if mask_type == AttnMaskType::Causal {
            let (q, k) = (randn(&[4, 2, NH, HN]), randn(&[3, 2, ng, HN]));
            let input = CoreAttentionInput::new(&q, &k, &k, mask_type);
            assert_err!("causal sq != sk", sdpa.plain_call(&input), ForwardError::Invalid { .. });
        }
        let (q3, k) = (randn(&[4, 2, NH * HN]), randn(&[4, 2, ng, HN]));
        let input = CoreAttentionInput::new(&q3, &k, &k, mask_type);
        assert_err!(
            "query rank 3",
            sdpa.plain_call(&input),
            ForwardError::Shape { name: "query", .. }
        );
    }
    Ok(())
}

/// `get_query_key_value_tensors(x, false)` is the grouped projection `[sq, b, ng, (P+2)·hn]`
/// with split sizes `[P·hn, hn, hn]`; with `true`, query `[sq, b, nh, hn]` and key/value
/// `[sq, b, ng, hn]`, which are the split of the grouped projection.
#[test]
fn query_key_value_tensors_shapes() -> Result<()> {
    let (sq, b, groups) = (5, 2, 2);
    let p = NH / groups;
    let built = build(&self_toml("dot-product-attention", "causal", "num_query_groups = 2"))?;
    let a = self_attention(&built.attn)?;
    let x = randn(&[sq, b, H]);
    let QkvTensors::Mixed { mixed, split_sizes } = a.get_query_key_value_tensors(&x, false)? else {
        bail!("split_qkv = false must return the mixed tensor");
    };
    ensure!(split_sizes == [p * HN, HN, HN], "split sizes {split_sizes:?}");
    ensure!(mixed.size() == [sq, b, groups, (p + 2) * HN], "mixed {:?}", mixed.size());
    let QkvTensors::Split { query, key, value } = a.get_query_key_value_tensors(&x, true)? else {
        bail!("split_qkv = true must return split tensors");
    };
    ensure!(query.size() == [sq, b, NH, HN], "query {:?}", query.size());
    ensure!(key.size() == [sq, b, groups, HN], "key {:?}", key.size());
    ensure!(value.size() == [sq, b, groups, HN], "value {:?}", value.size());
    let parts = mixed.split_with_sizes(split_sizes, 3);
    assert_close(&query, &parts[0].reshape([sq, b, NH, HN]), 0.0, 0.0, "query")?;
    assert_close(&key, &parts[1], 0.0, 0.0, "key")?;
    assert_close(&value, &parts[2], 0.0, 0.0, "value")
}

// ---------------------------------------------------------------------------------------------
// 4. Rotary
// ---------------------------------------------------------------------------------------------

/// `inv_freq[k] = 1 / base^(2k / dim)`, as f64.
fn inv_freq(dim: i64, base: f64) -> Vec<f64> {
    (0..dim / 2).map(|k| 1.0 / base.powf(2.0 * k as f64 / dim as f64)).collect()
}

/// `seq_len_interpolation_factor = 2` gives the table of positions `p / 2`, computed by hand
/// as `cat(outer(p / 2, inv_freq), same)`.
#[test]
fn rotary_interpolation_factor_halves_positions() -> Result<()> {
    let (dim, base, s) = (HN, 10000.0, 6);
    let rope = RotaryEmbedding::new(HN, 1.0, false, Some(2.0), base);
    let emb = rope.forward(s, 0, CPU);
    ensure!(emb.size() == [s, 1, 1, dim], "table {:?}", emb.size());
    let inv = inv_freq(dim, base);
    let mut want: Vec<f64> = Vec::new();
    for p in 0..s {
        let half: Vec<f64> = inv.iter().map(|f| p as f64 / 2.0 * f).collect();
        want.extend(half.iter().chain(&half));
    }
    let want = Tensor::from_slice(&want).reshape([s, 1, 1, dim]);
    assert_close(&emb, &want, 1e-6, 1e-6, "positions p / 2")
}

/// `forward(len, offset)` is rows `offset..offset + len` of a longer table, and the default
/// layout is `cat(freqs, freqs)` with `freqs = outer(p, inv_freq)`.
#[test]
fn rotary_offset_is_a_slice_of_a_longer_table() -> Result<()> {
    let rope = RotaryEmbedding::new(HN, 1.0, false, None, 10000.0);
    let long = rope.forward(12, 0, CPU);
    let part = rope.forward(4, 5, CPU);
    assert_close(&part, &long.narrow(0, 5, 4), 0.0, 0.0, "offset 5")?;
    let inv = inv_freq(HN, 10000.0);
    let mut want: Vec<f64> = Vec::new();
    for p in 0..12 {
        let half: Vec<f64> = inv.iter().map(|f| p as f64 * f).collect();
        want.extend(half.iter().chain(&half));
    }
    assert_close(&long, &Tensor::from_slice(&want).reshape([12, 1, 1, HN]), 1e-6, 1e-6, "table")
}

/// The interleaved table is `[f0, f0, f1, f1, ...]`.
#[test]
fn rotary_interleaved_layout() -> Result<()> {
    let plain = RotaryEmbedding::new(HN, 1.0, false, None, 10000.0).forward(5, 0, CPU);
    let inter = RotaryEmbedding::new(HN, 1.0, true, None, 10000.0);
    ensure!(inter.interleaved() && inter.dim() == HN, "interleaved rope of dim {}", inter.dim());
    let inter = inter.forward(5, 0, CPU);
    let freqs = plain.narrow(-1, 0, HN / 2);
    assert_close(&inter.slice(-1, 0, HN, 2), &freqs, 0.0, 0.0, "even channels")?;
    assert_close(&inter.slice(-1, 1, HN, 2), &freqs, 0.0, 0.0, "odd channels")
}

/// `rotary_percent = 0.5` rotates the first half of each head, as written out by hand, and
/// leaves the other half unchanged; rotating by the negated angles gives the input back.
#[test]
fn rotary_application() -> Result<()> {
    let (s, b, heads) = (5, 2, 3);
    for interleaved in [false, true] {
        let rope = RotaryEmbedding::new(HN, 0.5, interleaved, None, 10000.0);
        let rot = rope.dim();
        ensure!(rot == HN / 2, "rot_dim {rot}");
        let freqs = rope.forward(s, 0, CPU);
        let t = randn(&[s, b, heads, HN]);
        let out = apply_rotary_pos_emb(&t, &freqs, interleaved)?;
        let label = format!("interleaved {interleaved}");
        assert_close(
            &out.narrow(-1, rot, HN - rot),
            &t.narrow(-1, rot, HN - rot),
            0.0,
            0.0,
            &format!("{label}: pass-through channels"),
        )?;
        // By hand: pairs (x, y) of channels sharing angle f go to (x cos f - y sin f,
        // y cos f + x sin f); pairs are (k, k + rot/2) or (2k, 2k + 1).
        let theta = plain_freqs(&freqs, rot, interleaved)?; // [s, 1, 1, rot / 2]
        let (c, sn) = (theta.cos(), theta.sin());
        let (x, y) = pairs(&t.narrow(-1, 0, rot), interleaved)?;
        let (ox, oy) = pairs(&out.narrow(-1, 0, rot), interleaved)?;
        assert_close(&ox, &(&x * &c - &y * &sn), 1e-6, 1e-6, &format!("{label}: x"))?;
        assert_close(&oy, &(&y * &c + &x * &sn), 1e-6, 1e-6, &format!("{label}: y"))?;
        let back = apply_rotary_pos_emb(&out, &freqs.neg(), interleaved)?;
        assert_close(&back, &t, 1e-5, 1e-5, &format!("{label}: inverse"))?;
    }
    Ok(())
}

/// The `rot / 2` distinct angles of a table.
fn plain_freqs(freqs: &Tensor, rot: i64, interleaved: bool) -> Result<Tensor> {
    Ok(if interleaved { freqs.f_slice(-1, 0, rot, 2)? } else { freqs.f_narrow(-1, 0, rot / 2)? })
}

/// The two members of each rotated channel pair.
fn pairs(t: &Tensor, interleaved: bool) -> Result<(Tensor, Tensor)> {
    let d = t.size().last().copied().unwrap_or(0);
    Ok(if interleaved {
        (t.f_slice(-1, 0, d, 2)?, t.f_slice(-1, 1, d, 2)?)
    } else {
        (t.f_narrow(-1, 0, d / 2)?, t.f_narrow(-1, d / 2, d / 2)?)
    })
}

/// Separate query and key tables (`RotaryPosEmb::Separate`) in a cross attention with
/// `sq != sk`: each covers its own length, the kinds agree, and a key table shorter than `sk`
/// is refused.
#[test]
fn rotary_separate_tables_in_cross_attention() -> Result<()> {
    let (sq, sk, b) = (3, 6, 2);
    let built = build_kinds(|c| cross_toml(c, "arbitrary", ""))?;
    let rope = RotaryEmbedding::from_config(&built[0].config);
    let (q_emb, k_emb) = (rope.forward(sq, 0, CPU), rope.forward(sk, 0, CPU));
    let x = randn(&[sq, b, H]);
    let kv = randn(&[sk, b, H]);
    let mut outs = Vec::new();
    for bt in &built {
        let mut input = AttentionInput::new(&x).with_key_value_states(&kv);
        input.rotary_pos_emb = Some(RotaryPosEmb::Separate { query: &q_emb, key: &k_emb });
        outs.push(bt.attn.forward(&input)?.output);
        let short = rope.forward(sk - 1, 0, CPU);
        input.rotary_pos_emb = Some(RotaryPosEmb::Separate { query: &q_emb, key: &short });
        assert_err!(
            "key table shorter than sk",
            bt.attn.forward(&input),
            ForwardError::Shape { name: "rotary_pos_emb (key)", .. }
        );
    }
    assert_close_scaled(&outs[1], &outs[0], "separate tables: sdpa vs dot-product-attention")
}

// ---------------------------------------------------------------------------------------------
// 5. Fused QKV layout
// ---------------------------------------------------------------------------------------------

/// `linear_qkv` rows hold, per group `g`, its `P` query heads, its key head and its value head
/// (`hn` rows each, `G = (P + 2)·hn` rows per group): rows of each block filled with a label,
/// and a one-hot input, give each split head its block's label.
#[test]
fn fused_qkv_layout_labels() -> Result<()> {
    let groups = 2;
    let p = NH / groups;
    let g_rows = (p + 2) * HN;
    let built = build(&self_toml("dot-product-attention", "causal", "num_query_groups = 2"))?;
    let a = self_attention(&built.attn)?;
    let label = |g: i64, slot: i64| (100 * g + slot + 1) as f64; // slot: j < P, P = key, P+1 = value
    let mut w = a.linear_qkv().weight().shallow_clone();
    tch::no_grad(|| -> Result<()> {
        let _ = w.f_zero_()?;
        for g in 0..groups {
            for slot in 0..p + 2 {
                let mut block = w.f_narrow(0, g * g_rows + slot * HN, HN)?.f_narrow(1, 0, 1)?;
                let _ = block.f_fill_(label(g, slot))?;
            }
        }
        if let Some(bias) = a.linear_qkv().bias() {
            let _ = bias.shallow_clone().f_zero_()?;
        }
        Ok(())
    })?;
    let x = Tensor::zeros([1, 1, H], F32);
    let _ = x.narrow(2, 0, 1).f_fill_(1)?;
    let QkvTensors::Split { query, key, value } = a.get_query_key_value_tensors(&x, true)? else {
        bail!("expected split tensors");
    };
    for i in 0..NH {
        let want = Tensor::full([HN], label(i / p, i % p), F32);
        assert_close(&query.get(0).get(0).get(i), &want, 0.0, 0.0, &format!("query head {i}"))?;
    }
    for g in 0..groups {
        let want_k = Tensor::full([HN], label(g, p), F32);
        let want_v = Tensor::full([HN], label(g, p + 1), F32);
        assert_close(&key.get(0).get(0).get(g), &want_k, 0.0, 0.0, &format!("key {g}"))?;
        assert_close(&value.get(0).get(0).get(g), &want_v, 0.0, 0.0, &format!("value {g}"))?;
    }
    Ok(())
}

/// With a random `linear_qkv` weight and bias, query head `i` (`g = i / P`, `j = i % P`) is the
/// input times rows `g·G + j·hn ..` of the weight (plus the same rows of the bias), key `g`
/// rows `g·G + P·hn ..` and value `g` rows `g·G + (P+1)·hn ..`; for GQA and MQA.
#[test]
fn fused_qkv_layout_random_weights() -> Result<()> {
    for groups in [2, 1] {
        let p = NH / groups;
        let g_rows = (p + 2) * HN;
        let extra = format!("num_query_groups = {groups}");
        let built = build(&self_toml("sdpa", "causal", &extra))?;
        let a = self_attention(&built.attn)?;
        let rows = (NH + 2 * groups) * HN;
        let w_val = randn(&[rows, H]);
        let b_val = randn(&[rows]);
        let mut w = a.linear_qkv().weight().shallow_clone();
        let Some(bias) = a.linear_qkv().bias() else { bail!("linear_qkv has no bias") };
        let mut bias = bias.shallow_clone();
        tch::no_grad(|| -> Result<()> {
            w.f_copy_(&w_val)?;
            bias.f_copy_(&b_val)?;
            Ok(())
        })?;
        let x = randn(&[3, 2, H]);
        let QkvTensors::Split { query, key, value } = a.get_query_key_value_tensors(&x, true)?
        else {
            bail!("expected split tensors");
        };
        let head = |row: i64| x.matmul(&w_val.narrow(0, row, HN).tr()) + b_val.narrow(0, row, HN);
        for i in 0..NH {
            let (g, j) = (i / p, i % p);
            let want = head(g * g_rows + j * HN);
            assert_close_scaled(
                &query.select(2, i),
                &want,
                &format!("{groups} groups: query {i}"),
            )?;
        }
        for g in 0..groups {
            let k = head(g * g_rows + p * HN);
            let v = head(g * g_rows + (p + 1) * HN);
            assert_close_scaled(&key.select(2, g), &k, &format!("{groups} groups: key {g}"))?;
            assert_close_scaled(&value.select(2, g), &v, &format!("{groups} groups: value {g}"))?;
        }
    }
    Ok(())
}
