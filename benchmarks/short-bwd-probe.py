# Probe: forward+backward of one short sequence (the bench's `prefill-short` shapes) under
# each SDPA backend: which one SDPA default picks, and the GPU time of each backend's kernels
# per forward+backward (from the profiler, so Python's host time does not count).
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

F = torch.nn.functional
dev = "cuda"
names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}


def kernels_us(f, iters=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            f()
        torch.cuda.synchronize()
    per = {}
    for e in p.key_averages():
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            per[e.key] = e.self_device_time_total / iters
    return sum(per.values()), per


for hd in (128, 64):
    h = 2048 // hd
    for causal in (False, True):
        for s in (128, 256, 512):
            mk = lambda: torch.randn(1, s, h, hd, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            q, k, v = mk(), mk(), mk()
            g = torch.randn(1, h, s, hd, device=dev, dtype=torch.bfloat16)
            choice = names.get(torch._fused_sdp_choice(q, k, v, None, 0.0, causal), "?")
            line = f"hd{hd} {'causal' if causal else 'full':6} s{s:<4} default={choice:9}"
            detail = []
            for be, bn in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION, "efficient")):
                def fb():
                    with sdpa_kernel(be):
                        (F.scaled_dot_product_attention(q, k, v, is_causal=causal) * g).sum().backward()
                try:
                    tot, per = kernels_us(fb)
                    line += f" {bn} {tot:6.1f}us"
                    if hd == 64 and causal and s == 256:
                        detail.append((bn, sorted(per.items(), key=lambda x: -x[1])[:8]))
                except RuntimeError as e:
                    line += f" {bn} n/a"
            print(line, flush=True)
            for bn, per in detail:
                for kname, us in per:
                    print(f"    {bn}: {us:7.2f}us {kname[:110]}")
