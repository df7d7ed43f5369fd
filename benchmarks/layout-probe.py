# Prefill forward (bf16, no grad): does cuDNN's attention run slower on Megatron's [s, b, h, d]
# memory than on [b, s, h, d], and does another view of the same [s, b, h, d] memory recover it?
#   bshd:   [b, s, h, d] memory viewed [b, h, s, d] (the bench's SDPA-default baseline)
#   sbhd:   [s, b, h, d] memory viewed [b, h, s, d] (what sdpa-cuda passes today)
#   folded: [s, b, h, d] memory viewed [1, b * h, s, d] (batch folded into heads: the same
#           problem, since a head's rows are s-strided either way)
# Each round times every variant once (CUDA events, 10 calls); medians over the rounds.
import sys
import torch

aten = torch.ops.aten
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, "cudnn", torch.backends.cudnn.version())
SHAPES = [(512, 32), (1024, 16), (2048, 8), (4096, 4), (8192, 2)]
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 9


def cudnn(q, k, v, causal):
    return aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False)[0]


def flash(q, k, v, causal):
    return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]


def timed(f, calls=10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / calls * 1e-3


with torch.no_grad():
    for hd in (128, 64):
        h = 2048 // hd
        for causal in (False, True):
            for s, b in SHAPES:
                flops = 4 * b * h * s * s * hd * (0.5 if causal else 1.0)
                bshd = [torch.randn(b, s, h, hd, device=dev, dtype=torch.bfloat16) for _ in range(3)]
                sbhd = [torch.randn(s, b, h, hd, device=dev, dtype=torch.bfloat16) for _ in range(3)]
                va = [t.transpose(1, 2) for t in bshd]
                vb = [t.permute(1, 2, 0, 3) for t in sbhd]
                vc = [t.view(s, b * h, hd).permute(1, 0, 2).unsqueeze(0) for t in sbhd]
                variants = {
                    "bshd cudnn": lambda: cudnn(*va, causal),
                    "sbhd cudnn": lambda: cudnn(*vb, causal),
                    "folded cudnn": lambda: cudnn(*vc, causal),
                    "bshd sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(*va, is_causal=causal),
                    "sbhd flash": lambda: flash(*vb, causal),
                    "folded flash": lambda: flash(*vc, causal),
                }
                # Same answer from the folded view (one check per case).
                ob = cudnn(*vb, causal).permute(2, 0, 1, 3)
                oc = cudnn(*vc, causal)[0].permute(1, 0, 2).reshape(s, b, h, hd)
                diff = (ob.float() - oc.float()).abs().max().item()
                for f in variants.values():
                    f()
                torch.cuda.synchronize()
                times = {n: [] for n in variants}
                for _ in range(ROUNDS):
                    for n, f in variants.items():
                        times[n].append(timed(f))
                med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
                base = med["bshd sdpa"]
                cells = " | ".join(f"{n} {flops / t / 1e12:.1f} (x{base / t:.3f})" for n, t in med.items())
                print(f"hd{hd} {'causal' if causal else 'full'} s{s} b{b}: {cells} | max diff {diff:.1e}", flush=True)
