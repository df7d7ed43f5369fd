# A/A test of the bench's timing rounds: the same cuDNN prefill forward timed in three slots of
# each round (as `time_each` does: 10 calls, synchronise, next slot). If the slots differ, the
# order of the functions in a round biases their comparison. Then the same with the order
# rotated each round (each function takes every slot equally often).
import sys
import torch

aten = torch.ops.aten
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__)
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
CASES = [(128, False, 2048, 8), (128, True, 4096, 4), (64, False, 2048, 8), (128, False, 512, 32), (128, False, 8192, 2)]


def timed(f, calls=10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / calls * 1e-3


with torch.no_grad():
    for hd, causal, s, b in CASES:
        h = 2048 // hd
        flops = 4 * b * h * s * s * hd * (0.5 if causal else 1.0)
        # Three copies of the same inputs, so that no slot reads what the one before left in L2.
        ins = [[torch.randn(s, b, h, hd, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3) for _ in range(3)] for _ in range(3)]
        fs = [lambda i=i: aten._scaled_dot_product_cudnn_attention(*ins[i], None, False, 0.0, causal, False) for i in range(3)]
        for f in fs:
            f(); f()
        torch.cuda.synchronize()
        for rotate in (False, True):
            by_slot = [[] for _ in fs]
            by_fn = [[] for _ in fs]
            for r in range(ROUNDS):
                order = [(r + j) % 3 for j in range(3)] if rotate else [0, 1, 2]
                for slot, i in enumerate(order):
                    t = timed(fs[i])
                    by_slot[slot].append(t)
                    by_fn[i].append(t)
            med = lambda t: sorted(t)[len(t) // 2]
            slots = " ".join(f"{flops / med(t) / 1e12:.1f}" for t in by_slot)
            fns = " ".join(f"{flops / med(t) / 1e12:.1f}" for t in by_fn)
            print(f"hd{hd} {'causal' if causal else 'full'} s{s} b{b} {'rotated' if rotate else 'fixed  '}: TFLOP/s by slot {slots} | by function {fns}", flush=True)
