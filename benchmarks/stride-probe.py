# Probe: cuDNN's prefill forward through libtorch on the same memory under different strides.
# At batch 1, Megatron's [s, b, h, d] and the baseline's [b, s, h, d] are the same memory and
# differ only in the (unused) batch stride; does cuDNN's speed follow that stride?
import torch

torch.manual_seed(0)
dev = "cuda"
cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention


def t(f, iters=10):
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(iters):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def run(hd, causal, s, b):
    h = 2048 // hd
    fl = 4.0 * b * h * s * s * hd * (0.5 if causal else 1.0)
    mk = lambda: torch.randn(b, s, h, hd, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    q0, k0, v0 = mk(), mk(), mk()
    mk2 = lambda: torch.randn(s, b, h, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3)
    q, k, v = mk2(), mk2(), mk2()
    # The same [s, b, h, d] memory with the batch stride made the largest (s * b * h * d
    # would overlap nothing at b = 1; at b > 1 it is only valid when b == 1).
    fix = lambda x: x.as_strided(x.shape, (s * h * hd, hd, h * hd, 1)) if b == 1 else x
    q1, k1, v1 = fix(q), fix(k), fix(v)
    fs = {
        "default bshd": lambda: torch.nn.functional.scaled_dot_product_attention(q0, k0, v0, is_causal=causal),
        "cudnn bshd": lambda: cudnn(q0, k0, v0, None, False, 0.0, causal, False),
        "cudnn sbhd": lambda: cudnn(q, k, v, None, False, 0.0, causal, False),
        "cudnn sbhd bstride": lambda: cudnn(q1, k1, v1, None, False, 0.0, causal, False),
    }
    o = cudnn(q1, k1, v1, None, False, 0.0, causal, False)[0]
    r = cudnn(q, k, v, None, False, 0.0, causal, False)[0]
    assert torch.equal(o, r), "stride change changed the result"
    names = list(fs)
    for f in fs.values():
        t(f, 3)
    ts = {n: [] for n in names}
    for rep in range(7):
        for j in range(len(names)):
            n = names[(j + rep) % len(names)]
            ts[n].append(t(fs[n]))
    med = {n: sorted(v)[3] for n, v in ts.items()}
    print(f"hd{hd} {'causal' if causal else 'full':6} s{s:<5} b{b:<2} " + "  ".join(f"{n} {fl / med[n] / 1e9:6.1f}" for n in names) + "  TFLOP/s", flush=True)


for hd in (128, 64):
    for causal in (False, True):
        for s, b in ((512, 32), (2048, 8), (4096, 4), (8192, 2), (16384, 1), (4096, 1), (8192, 1)):
            run(hd, causal, s, b)
