//! Training extras: custom autograd functions, selective recompute and delayed weight gradients
//! (gradients equal the plain path, fp32 1e-6), QK-Clip (Megatron's rule, the per-head mode,
//! tensor-parallel shards), realtime consistency checks across ranks, and
//! `set_for_recompute_input_layernorm`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use attention_core::autograd::{Function, apply};
use attention_core::training::{QkClipMode, ThreadGroup, TrainingError, clip_linear_qkv};
use attention_core::{Attention, AttentionInput, CrossAttention, SelfAttention};
use attention_spec::module::PackedSeqParams;
use attention_spec::{ForwardError, Model};
use attention_tests::{assert_close, test_devices};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-6;

thread_local! {
    static DEVICE: std::cell::Cell<Device> = const { std::cell::Cell::new(Device::Cpu) };
}

/// The device the current test body runs on.
fn dev() -> Device {
    DEVICE.with(std::cell::Cell::get)
}

/// Held by every test of this binary while it runs: the tests seed libtorch's one global
/// generator and compare dropout masks, so another test drawing random numbers between a seed
/// and its use (the test harness runs tests on parallel threads) would change them.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn generator() -> std::sync::MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `body` on every test device (the CPU, and CUDA with the `cuda` feature).
fn on_each_device(body: fn() -> Result<()>) -> Result<()> {
    let _generator = generator();
    for d in test_devices() {
        DEVICE.with(|c| c.set(d));
        let r = body().with_context(|| format!("on {d:?}"));
        DEVICE.with(|c| c.set(Device::Cpu));
        r?;
    }
    Ok(())
}

fn build(toml: &str) -> Result<(VarStore, Attention)> {
    let model = Model::from_toml_str(toml, attention_core::registry()?)?;
    let layer = &model.layers[0];
    let vs = VarStore::new(dev());
    let attn = Attention::build(&vs.root(), &model.config, &layer.attention, layer.layer_number)?;
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let fan_in = *t.size().last().unwrap_or(&1) as f64;
            let _ = if t.dim() == 2 {
                t.normal_(0.0, 1.5 / fan_in.sqrt())
            } else if name.contains("layernorm") && name.ends_with("weight") {
                t.normal_(1.0, 0.1)
            } else {
                t.normal_(0.0, 0.1)
            };
        }
    });
    Ok((vs, attn))
}

fn self_attention(a: &Attention) -> Result<&SelfAttention> {
    match a {
        Attention::SelfAttention(s) => Ok(s),
        Attention::CrossAttention(_) => bail!("expected self attention"),
    }
}

fn cross_attention(a: &Attention) -> Result<&CrossAttention> {
    match a {
        Attention::CrossAttention(c) => Ok(c),
        Attention::SelfAttention(_) => bail!("expected cross attention"),
    }
}

fn config(extra: &str, core: &str) -> String {
    format!(
        "[transformer]\nhidden_size = 32\nnum_attention_heads = 4\nnum_query_groups = 2\n\
         kv_channels = 8\nattention_dropout = 0.0\n{extra}\n[attention]\npreset = \"gpt-local\"\n\
         submodules = {{ core_attention = \"{core}\" }}\n"
    )
}

/// Copies every parameter of `from` into `to` (same names).
fn copy_params(from: &VarStore, to: &VarStore) -> Result<()> {
    let src = from.variables();
    tch::no_grad(|| -> Result<()> {
        for (name, mut dst) in to.variables() {
            dst.copy_(src.get(&name).with_context(|| format!("no {name}"))?);
        }
        Ok(())
    })
}

struct Outcome {
    output: Tensor,
    grads: Vec<(String, Tensor)>,
}

/// Optional inputs of a forward.
#[derive(Clone, Copy, Default)]
struct Extras<'a> {
    mask: Option<&'a Tensor>,
    bias: Option<&'a Tensor>,
    rope: Option<&'a Tensor>,
    packed: Option<&'a PackedSeqParams>,
}

/// Forward (training) + backward of sum(out * g) (+ `backward_dw`); returns the output and
/// every gradient, then zeroes the parameters' gradients.
fn fwd_bwd(
    attn: &Attention,
    vs: &VarStore,
    x: &Tensor,
    g: &Tensor,
    e: Extras<'_>,
    seed: i64,
) -> Result<Outcome> {
    let x = x.detach().set_requires_grad(true);
    let mut input = AttentionInput::new(&x).training(true);
    if let Some(m) = e.mask {
        input = input.with_mask(m);
    }
    if let Some(b) = e.bias {
        input = input.with_bias(b);
    }
    if let Some(r) = e.rope {
        input = input.with_rotary(r);
    }
    if let Some(p) = e.packed {
        input = input.with_packed(p);
    }
    tch::manual_seed(seed);
    let out = with_bias(attn.forward(&input)?);
    (&out * g).sum(Kind::Float).backward();
    if let Attention::SelfAttention(s) = attn {
        s.backward_dw()?;
    }
    let mut grads = vec![("hidden_states".to_string(), x.grad())];
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (n, t) in vars {
        let mut g = t.grad();
        if g.defined() {
            grads.push((n, g.copy()));
            let _ = g.zero_();
        } else {
            grads.push((n, g));
        }
    }
    Ok(Outcome { output: out.detach(), grads })
}

fn same(a: &Outcome, b: &Outcome, label: &str) -> Result<()> {
    assert_close(&a.output, &b.output, TOL, TOL, &format!("{label}: output"))?;
    for ((n, ga), (_, gb)) in a.grads.iter().zip(&b.grads) {
        if !ga.defined() || !gb.defined() {
            bail!("{label}: gradient of {n} missing");
        }
        assert_close(ga, gb, TOL, TOL, &format!("{label}: grad {n}"))?;
    }
    Ok(())
}

struct Double {
    seen: usize,
}

impl Function for Double {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ForwardError> {
        self.seen = inputs.len();
        Ok(vec![&inputs[0] * 2.0 + &inputs[1]])
    }
    fn backward(&mut self, g: &[Tensor]) -> Result<Vec<Option<Tensor>>, ForwardError> {
        if g[0].abs().max().double_value(&[]) > 1e6 {
            return Err(ForwardError::Invalid {
                name: "double",
                reason: "gradient too large".into(),
            });
        }
        Ok(vec![Some(&g[0] * 2.0), None])
    }
}

/// A Rust function joins libtorch's autograd; its errors surface as errors.
#[test]
fn custom_function_gradients_and_errors() -> Result<()> {
    on_each_device(custom_function_gradients_and_errors_body)
}

fn custom_function_gradients_and_errors_body() -> Result<()> {
    let x = Tensor::randn([3, 4], (Kind::Float, dev())).set_requires_grad(true);
    let y = Tensor::randn([3, 4], (Kind::Float, dev()));
    let out = apply(Box::new(Double { seen: 0 }), &[&x, &y], 1)?.remove(0);
    assert_close(&out, &(&x * 2.0 + &y), 0.0, 0.0, "forward")?;
    (&out * 3.0).sum(Kind::Float).backward();
    assert_close(
        &x.grad(),
        &Tensor::full([3, 4], 6.0, (Kind::Float, dev())),
        0.0,
        0.0,
        "backward",
    )?;
    // An error in backward reaches the caller of backward.
    let out = apply(Box::new(Double { seen: 0 }), &[&x, &y], 1)?.remove(0);
    let err = (&out * 1e9).sum(Kind::Float).f_backward().err().context("expected an error")?;
    if !err.to_string().contains("gradient too large") {
        bail!("unexpected error: {err}");
    }
    // Wrong output count is an error, not a crash.
    assert!(apply(Box::new(Double { seen: 0 }), &[&x, &y], 2).is_err());
    Ok(())
}

/// Selective recompute of core attention gives the plain path's output and gradients, for
/// both kinds, with masks, a bias, packed sequences, rotary and dropout.
#[test]
fn selective_recompute_equals_plain_path() -> Result<()> {
    on_each_device(selective_recompute_equals_plain_path_body)
}

fn selective_recompute_equals_plain_path_body() -> Result<()> {
    for core in ["dot-product-attention", "sdpa"] {
        for dropout in [0.0, 0.2] {
            let extra =
                format!("attention_dropout = {dropout}\nposition_embedding_type = \"rope\"");
            let with_dropout =
                |extra: &str| config(extra, core).replace("attention_dropout = 0.0\n", "");
            let (vs_plain, plain) = build(&with_dropout(&extra))?;
            let recompute = format!("{extra}\nrecompute_granularity = \"selective\"");
            let (vs_rc, rc) = build(&with_dropout(&recompute))?;
            assert!(rc.config().checkpoint_core_attention());
            copy_params(&vs_plain, &vs_rc)?;
            let (s, b) = (9, 2);
            let x = Tensor::randn([s, b, 32], (Kind::Float, dev()));
            let g = Tensor::randn([s, b, 32], (Kind::Float, dev()));
            let rope =
                attention_core::RotaryEmbedding::from_config(plain.config()).forward(s, 0, dev());
            let mask = Tensor::rand([b, 1, s, s], (Kind::Float, dev())).lt(0.3);
            let bias = Tensor::randn([1, 4, s, s], (Kind::Float, dev())).set_requires_grad(true);
            let variants = [
                ("causal", Extras { rope: Some(&rope), ..Extras::default() }),
                ("mask+bias", Extras { mask: Some(&mask), bias: Some(&bias), ..Extras::default() }),
            ];
            for (name, e) in variants {
                let a = fwd_bwd(&plain, &vs_plain, &x, &g, e, 11)?;
                if name == "mask+bias" {
                    let bias_grad_plain = bias.grad().copy();
                    let _ = bias.grad().zero_();
                    let r = fwd_bwd(&rc, &vs_rc, &x, &g, e, 11)?;
                    same(&a, &r, &format!("{core} dropout {dropout} {name}"))?;
                    assert_close(&bias.grad(), &bias_grad_plain, TOL, TOL, "bias grad")?;
                    let _ = bias.grad().zero_();
                } else {
                    let r = fwd_bwd(&rc, &vs_rc, &x, &g, e, 11)?;
                    same(&a, &r, &format!("{core} dropout {dropout} {name}"))?;
                }
            }
            // Packed sequences, batch 1.
            let packed = PackedSeqParams::from_lengths(&[4, 3, 2], dev());
            let e = Extras { packed: Some(&packed), rope: Some(&rope), ..Extras::default() };
            let (xp, gp) = (x.narrow(1, 0, 1), g.narrow(1, 0, 1));
            let a = fwd_bwd(&plain, &vs_plain, &xp, &gp, e, 5)?;
            let r = fwd_bwd(&rc, &vs_rc, &xp, &gp, e, 5)?;
            same(&a, &r, &format!("{core} dropout {dropout} packed"))?;
        }
    }
    Ok(())
}

/// Delayed weight gradients: backward computes input gradients only; `backward_dw` then
/// produces the ordinary gradients, accumulated over micro-batches.
#[test]
fn delayed_wgrad_equals_ordinary_backward() -> Result<()> {
    on_each_device(delayed_wgrad_equals_ordinary_backward_body)
}

fn delayed_wgrad_equals_ordinary_backward_body() -> Result<()> {
    let base = "add_qkv_bias = true\nqk_layernorm = true";
    let (vs_plain, plain) = build(&config(base, "dot-product-attention"))?;
    let (vs_d, delayed) =
        build(&config(&format!("{base}\ndelay_wgrad_compute = true"), "dot-product-attention"))?;
    copy_params(&vs_plain, &vs_d)?;
    let d = self_attention(&delayed)?;
    // Nothing pending: a no-op returning 0.
    assert_eq!(d.backward_dw()?, 0);
    let mut expected: Vec<(String, Tensor)> = Vec::new();
    let mut x_grad_plain = Vec::new();
    let mut x_grad_delayed = Vec::new();
    for micro in 0..2 {
        let x = Tensor::randn([7, 2, 32], (Kind::Float, dev()));
        let g = Tensor::randn([7, 2, 32], (Kind::Float, dev()));
        let xp = x.detach().set_requires_grad(true);
        let out = plain.forward(&AttentionInput::new(&xp).training(true))?;
        (with_bias(out) * &g).sum(Kind::Float).backward();
        x_grad_plain.push(xp.grad());
        let xd = x.detach().set_requires_grad(true);
        let out = delayed.forward(&AttentionInput::new(&xd).training(true))?;
        (with_bias(out) * &g).sum(Kind::Float).backward();
        x_grad_delayed.push(xd.grad());
        // The ordinary backward ran for the norms and linear_proj's (returned) bias only.
        let vars = vs_d.variables();
        for n in ["linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight"] {
            if vars[n].grad().defined() && micro == 0 {
                bail!("{n} got a gradient before backward_dw");
            }
        }
        assert!(vars["q_layernorm.weight"].grad().defined());
        assert_eq!(
            (d.linear_qkv().pending_wgrads(), d.linear_proj().pending_wgrads()),
            (micro + 1, micro + 1)
        );
        if micro == 0 {
            continue;
        }
        let mut v: Vec<_> = vs_plain.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        expected = v.into_iter().map(|(n, t)| (n, t.grad())).collect();
    }
    for (a, b) in x_grad_plain.iter().zip(&x_grad_delayed) {
        assert_close(b, a, TOL, TOL, "input gradient")?;
    }
    assert_eq!(d.backward_qkv_proj()?, 2);
    assert_eq!(d.backward_output_proj()?, 2);
    assert_eq!(d.backward_dw()?, 0);
    let vars = vs_d.variables();
    for (n, e) in &expected {
        assert_close(&vars[n].grad(), e, TOL, TOL, &format!("grad {n}"))?;
    }
    Ok(())
}

fn with_bias(out: attention_core::AttentionOutput) -> Tensor {
    match out.bias {
        Some(b) => out.output + b,
        None => out.output,
    }
}

/// Megatron's rule on known maxima: heads [50, 250, 90, 80 | 400, 10, 20, 30], τ 100, α 0.5
/// give η = [0.4, 0.25]; query rows scale by √η, key rows by √η, values untouched.
#[test]
fn qk_clip_known_logits() -> Result<()> {
    on_each_device(qk_clip_known_logits_body)
}

fn qk_clip_known_logits_body() -> Result<()> {
    let (np, ngp, hn, h) = (8, 2, 4, 16);
    let w = Tensor::randn([(np + 2 * ngp) * hn, h], (Kind::Float, dev()));
    let before = w.copy();
    let m = Tensor::from_slice(&[50.0f32, 250., 90., 80., 400., 10., 20., 30.]);
    let factors = clip_linear_qkv(&w, &m, (np, ngp, hn), 100.0, 0.5, QkClipMode::PerGroup)?;
    let expected = Tensor::from_slice(&[0.4f64, 0.4, 0.4, 0.4, 0.25, 0.25, 0.25, 0.25]);
    assert_close(&factors, &expected, 1e-12, 0.0, "η per head")?;
    let rows = (np / ngp + 2) * hn;
    for (g, eta) in [(0, 0.4f64), (1, 0.25)] {
        let blk = |t: &Tensor, off: i64, n: i64| t.narrow(0, g * rows + off, n);
        let q = np / ngp * hn;
        assert_close(&blk(&w, 0, q), &(blk(&before, 0, q) * eta.sqrt()), 1e-6, 1e-6, "query rows")?;
        assert_close(&blk(&w, q, hn), &(blk(&before, q, hn) * eta.sqrt()), 1e-6, 1e-6, "key rows")?;
        assert!(blk(&w, q + hn, hn).equal(&blk(&before, q + hn, hn)), "value rows changed");
    }
    // Per head: each head's logits shrink by exactly min(τ/m_h, 1).
    let w2 = before.copy();
    let f = clip_linear_qkv(&w2, &m, (np, ngp, hn), 100.0, 0.5, QkClipMode::PerHead)?;
    let want = Tensor::from_slice(&[1.0f64, 0.4, 1.0, 1.0, 0.25, 1.0, 1.0, 1.0]);
    assert_close(&f, &want, 1e-12, 0.0, "η per head")?;
    for head in 0..np {
        let (g, j) = (head / 4, head % 4);
        let qrow = |t: &Tensor| t.narrow(0, g * rows + j * hn, hn);
        let krow = |t: &Tensor| t.narrow(0, g * rows + 4 * hn, hn);
        // q·k for this head scales by (q factor)(k factor) = η_h.
        let ratio =
            (qrow(&w2).matmul(&krow(&w2).tr())) / (qrow(&before).matmul(&krow(&before).tr()));
        let eta_h = [1.0, 0.4, 1.0, 1.0, 0.25, 1.0, 1.0, 1.0][head as usize];
        assert_close(
            &ratio,
            &Tensor::full(ratio.size(), eta_h, (Kind::Float, dev())),
            1e-4,
            1e-4,
            "per-head product",
        )?;
    }
    // A tensor-parallel shard (one group each) clipped with its own heads equals the full clip.
    let shards: Vec<Tensor> = (0..2).map(|r| before.narrow(0, r * rows, rows).copy()).collect();
    for (r, shard) in shards.iter().enumerate() {
        let _ = clip_linear_qkv(
            shard,
            &m.narrow(0, 4 * r as i64, 4),
            (4, 1, hn),
            100.0,
            0.5,
            QkClipMode::PerGroup,
        )?;
    }
    assert_close(&Tensor::cat(&shards, 0), &w, 1e-7, 1e-7, "shards")?;
    // Wrong logit count.
    assert!(matches!(
        clip_linear_qkv(&w, &m.narrow(0, 0, 4), (np, ngp, hn), 100.0, 0.5, QkClipMode::PerGroup),
        Err(TrainingError::LogitShape { .. })
    ));
    Ok(())
}

/// Max logits of training forwards: recorded by both kinds (scaled, masked, max over micro-
/// batches), clipped by `clip_qk` so that afterwards each group's max is at most τ.
#[test]
fn qk_clip_end_to_end() -> Result<()> {
    on_each_device(qk_clip_end_to_end_body)
}

fn qk_clip_end_to_end_body() -> Result<()> {
    for core in ["dot-product-attention", "sdpa"] {
        for mode in [QkClipMode::PerGroup, QkClipMode::PerHead] {
            let extra = "qk_clip = true\nqk_clip_threshold = 4.0\nadd_bias_linear = false\nsoftmax_scale = 0.5";
            let (_vs, attn) = build(&config(extra, core))?;
            let a = self_attention(&attn)?;
            assert!(matches!(a.clip_qk(), Err(TrainingError::NoLogitsRecorded)));
            let xs: Vec<Tensor> =
                (0..2).map(|_| Tensor::randn([8, 2, 32], (Kind::Float, dev())) * 2.0).collect();
            let mask = Tensor::rand([2, 1, 8, 8], (Kind::Float, dev())).lt(0.2);
            // Eval forwards record nothing.
            a.forward(&AttentionInput::new(&xs[0]))?;
            assert!(a.core_attention().max_attention_logits().is_none());
            for x in &xs {
                a.forward(&AttentionInput::new(x).with_mask(&mask).training(true))?;
            }
            let recorded = a.core_attention().max_attention_logits().context("recorded")?;
            // Expected: max over both micro-batches of mask(q·kᵀ·scale), per head.
            let expected =
                xs.iter().map(|x| manual_max_logits(a, x, &mask)).collect::<Result<Vec<_>>>()?;
            let expected = expected[0].maximum(&expected[1]);
            assert_close(&recorded, &expected, 1e-4, 1e-5, &format!("{core}: recorded maxima"))?;
            let report = a.clip_qk_with(mode)?;
            assert!(report.clipped, "{core}: logits {recorded} should exceed 4");
            assert!(a.core_attention().max_attention_logits().is_none(), "tracker not reset");
            let after =
                xs.iter().map(|x| manual_max_logits(a, x, &mask)).collect::<Result<Vec<_>>>()?;
            let after = after[0].maximum(&after[1]);
            let want = match mode {
                QkClipMode::PerHead => expected.clamp_max(4.0),
                QkClipMode::PerGroup => &expected * report.head_factors.to_kind(Kind::Float),
            };
            assert_close(
                &after,
                &want,
                1e-4,
                1e-4,
                &format!("{core} {mode:?}: maxima after clip"),
            )?;
            assert!(after.max().double_value(&[]) <= 4.0 + 1e-4);
        }
    }
    // qk_clip off.
    let (_vs, attn) = build(&config("", "sdpa"))?;
    assert!(matches!(self_attention(&attn)?.clip_qk(), Err(TrainingError::QkClipDisabled)));
    Ok(())
}

/// Per-head max of mask(q·kᵀ·scale) computed by hand from the attention's own projections.
fn manual_max_logits(a: &SelfAttention, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let attention_core::attention::QkvTensors::Split { query, key, .. } =
        a.get_query_key_value_tensors(x, true)?
    else {
        bail!("split");
    };
    let k = key.repeat_interleave_self_int(2, 2, None);
    let scores = query.permute([1, 2, 0, 3]).matmul(&k.permute([1, 2, 3, 0])) * 0.5;
    Ok(scores.masked_fill(mask, f64::NEG_INFINITY).amax([0, 2, 3], false).detach())
}

/// `run_realtime_tests` across an in-process group: identical ranks pass, a corrupted one is
/// named; `test_mode` runs it in every forward.
#[test]
fn realtime_tests_across_ranks() -> Result<()> {
    let _generator = generator();
    let toml = config("qk_layernorm = true\ntest_mode = true", "sdpa");
    // One rank: runs and passes.
    let (_vs, attn) = build(&toml)?;
    self_attention(&attn)?.run_realtime_tests()?;
    for corrupt in [None, Some(2usize)] {
        let dp = ThreadGroup::new(3);
        let tp = ThreadGroup::new(3);
        let handles: Vec<_> = dp
            .into_iter()
            .zip(tp)
            .map(|(dp, tp)| {
                let toml = toml.clone();
                std::thread::spawn(move || -> Result<std::result::Result<(), String>> {
                    let rank = dp.rank_id();
                    tch::manual_seed(0);
                    let (vs, mut attn) = build(&toml)?;
                    tch::manual_seed(0);
                    // Ranks are threads sharing libtorch's generator: set the norms by hand.
                    tch::no_grad(|| {
                        for (name, mut t) in vs.variables() {
                            if name.contains("layernorm") {
                                let _ = t.fill_(if name.ends_with("weight") { 1.0 } else { 0.0 });
                            }
                        }
                        if Some(rank) == corrupt {
                            let _ = vs.variables()["q_layernorm.weight"]
                                .narrow(0, 3, 1)
                                .fill_(1.0 + 1e-6);
                        }
                    });
                    let Attention::SelfAttention(a) = &mut attn else { bail!("self") };
                    a.set_realtime_test_groups(Arc::new(dp), Arc::new(tp));
                    let x = Tensor::randn([4, 1, 32], (Kind::Float, Device::Cpu));
                    Ok(a.forward(&AttentionInput::new(&x)).map(|_| ()).map_err(|e| e.to_string()))
                })
            })
            .collect();
        let results: Vec<std::result::Result<(), String>> = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("rank panicked"))?)
            .collect::<Result<_>>()?;
        match corrupt {
            None => {
                for r in &results {
                    r.clone().map_err(anyhow::Error::msg)?;
                }
            }
            Some(bad) => {
                for r in &results {
                    let e = r.clone().err().context("every rank must fail")?;
                    if !e.contains("q_layernorm.weight")
                        || !e.contains(&format!("[{bad}]"))
                        || !e.contains("data-parallel")
                    {
                        bail!("unexpected message: {e}");
                    }
                }
            }
        }
    }
    Ok(())
}

trait RankId {
    fn rank_id(&self) -> usize;
}

impl RankId for ThreadGroup {
    fn rank_id(&self) -> usize {
        use attention_core::training::Communicator;
        self.rank()
    }
}

/// The recompute-input-layernorm switch: recorded on self attention, refused by cross
/// attention (as Megatron's base class).
#[test]
fn set_for_recompute_input_layernorm() -> Result<()> {
    on_each_device(set_for_recompute_input_layernorm_body)
}

fn set_for_recompute_input_layernorm_body() -> Result<()> {
    let (_vs, attn) = build(&config("", "dot-product-attention"))?;
    let a = self_attention(&attn)?;
    assert!(!a.recompute_input_layernorm());
    a.set_for_recompute_input_layernorm();
    assert!(a.recompute_input_layernorm());
    let cross = "[transformer]\nhidden_size = 32\nnum_attention_heads = 4\nattention_dropout = 0.0\n[attention]\npreset = \"t5-cross-local\"\n";
    let (_vs, c) = build(cross)?;
    let c = cross_attention(&c)?;
    assert!(matches!(c.set_for_recompute_input_layernorm(), Err(TrainingError::Unsupported(_))));
    assert!(matches!(c.clip_qk(), Err(TrainingError::Unsupported(_))));
    Ok(())
}
