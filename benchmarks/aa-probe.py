# Probe: six identical cuDNN forward calls (hd128 causal s4096 b4 on [s, b, h, d] memory), each
# keeping its last output alive so that each has its own output memory, timed in rotated rounds.
# Is a slow function slow in every round (its memory) or are slow rounds slow for all (time)?
import sys
import torch

dev = "cuda"
cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
hd, causal, s, b = 128, True, 4096, 4
if len(sys.argv) > 1:
    hd, causal, s, b = int(sys.argv[1]), sys.argv[2] == "causal", int(sys.argv[3]), int(sys.argv[4])
h = 2048 // hd
fl = 4.0 * b * h * s * s * hd * (0.5 if causal else 1.0)
mk2 = lambda: torch.randn(s, b, h, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3)
q, k, v = mk2(), mk2(), mk2()
keep = [None] * 6


def f(i):
    def g():
        keep[i] = cudnn(q, k, v, None, False, 0.0, causal, False)[0]
    return g


def t(g, iters=10):
    a, e = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(iters):
        g()
    e.record()
    e.synchronize()
    return a.elapsed_time(e) / iters


fs = [f(i) for i in range(6)]
for g in fs:
    t(g, 3)
print("outputs:", [hex(x.data_ptr()) for x in keep])
rows = []
for rep in range(18):
    row = [0.0] * 6
    for j in range(6):
        i = (j + rep) % 6
        row[i] = fl / t(fs[i]) / 1e9
    rows.append(row)
    print(f"round {rep:2} first f{rep % 6}: " + " ".join(f"{x:6.1f}" for x in row), flush=True)
med = [sorted(r[i] for r in rows)[9] for i in range(6)]
print(f"hd{hd} {'causal' if causal else 'full'} s{s} b{b} medians: " + " ".join(f"{x:6.1f}" for x in med))
