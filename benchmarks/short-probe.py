# Short prefill (one sequence of 128-512 tokens, bf16, no grad; the bench's `prefill-short`
# group): which backend libtorch's SDPA picks on [b, s, h, d] and on Megatron's [s, b, h, d]
# memory, and the time per call of each backend on each (host-bound: 200 calls between
# synchronisations, medians of 9 interleaved rounds).
import time
import torch

aten = torch.ops.aten
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version())
NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", -1: "none"}


def per_call(f, calls=200):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls


with torch.no_grad():
    for hd in (128, 64):
        h = 2048 // hd
        for causal in (False, True):
            for s in (128, 256, 512):
                a = [torch.randn(1, s, h, hd, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
                b = [torch.randn(s, 1, h, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3) for _ in range(3)]
                choice = [NAMES.get(int(torch._fused_sdp_choice(*x, None, 0.0, causal)), "?") for x in (a, b)]
                fs = {
                    "default bshd": lambda: torch.nn.functional.scaled_dot_product_attention(*a, is_causal=causal),
                    "default sbhd": lambda: torch.nn.functional.scaled_dot_product_attention(*b, is_causal=causal),
                    "cudnn bshd": lambda: aten._scaled_dot_product_cudnn_attention(*a, None, False, 0.0, causal, False),
                    "cudnn sbhd": lambda: aten._scaled_dot_product_cudnn_attention(*b, None, False, 0.0, causal, False),
                    "flash bshd": lambda: aten._scaled_dot_product_flash_attention(*a, 0.0, causal),
                    "flash sbhd": lambda: aten._scaled_dot_product_flash_attention(*b, 0.0, causal),
                }
                for f in fs.values():
                    f()
                t = {n: [] for n in fs}
                for _ in range(9):
                    for n, f in fs.items():
                        t[n].append(per_call(f))
                cells = " | ".join(f"{n} {sorted(v)[4] * 1e6:.1f}" for n, v in t.items())
                print(f"hd{hd} {'causal' if causal else 'full'} s{s} b1: choice bshd {choice[0]}, sbhd {choice[1]} | us per call: {cells}", flush=True)
