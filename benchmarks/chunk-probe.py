# Continued prefill chunk (n new tokens on C cached ones, bottom-right causal, 32/8 heads,
# hd 128, bf16): which libtorch kernels can attend it, how fast, how close to fp32.
import torch, time, sys
torch.manual_seed(0)
dev = "cuda"
hq, hkv, d = 32, 8, 128
scale = d ** -0.5
aten = torch.ops.aten
print(torch.cuda.get_device_name(), torch.__version__)

def timeit(f, reps=20):
    for _ in range(3): f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps): f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps

def ref(q, k, v, C):
    # q [n, hq, d], k/v [C+n, hkv, d]
    n = q.shape[0]
    g = hq // hkv
    kk = k.float().repeat_interleave(g, 1).transpose(0, 1)
    vv = v.float().repeat_interleave(g, 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ kk.transpose(1, 2)) * scale
    i = torch.arange(n, device=dev)[:, None]; j = torch.arange(C + n, device=dev)[None, :]
    s = s.masked_fill(j > i + C, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(0, 1)

# 1. does the cuDNN op take GQA directly, and its lse shape
q = torch.randn(1, hq, 256, d, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, hkv, 512, d, device=dev, dtype=torch.bfloat16)
try:
    r = aten._scaled_dot_product_cudnn_attention(q, k, k, None, True, 0.0, False, False, scale=scale)
    print("cudnn gqa ok, out", tuple(r[0].shape), r[0].stride(), "lse", tuple(r[1].shape), r[1].dtype)
except Exception as e:
    print("cudnn gqa refused:", str(e).splitlines()[0][:200])
kr = k.repeat_interleave(4, 1)
r = aten._scaled_dot_product_cudnn_attention(q, kr, kr, None, True, 0.0, False, False, scale=scale)
print("cudnn mha out", tuple(r[0].shape), r[0].stride(), "lse", tuple(r[1].shape), r[1].stride(), r[1].dtype)
# sbhd views
qs = torch.randn(256, 1, hq, d, device=dev, dtype=torch.bfloat16)
ks = torch.randn(512, 1, hkv, d, device=dev, dtype=torch.bfloat16)
try:
    r = aten._scaled_dot_product_cudnn_attention(qs.permute(1, 2, 0, 3), ks.permute(1, 2, 0, 3), ks.permute(1, 2, 0, 3), None, True, 0.0, False, False, scale=scale)
    print("cudnn gqa sbhd ok, out strides", r[0].stride(), "lse", tuple(r[1].shape), r[1].stride())
except Exception as e:
    print("cudnn gqa sbhd refused:", str(e).splitlines()[0][:200])

def merge(o1, l1, o2, l2):
    # o [n, hq, d] bf16, l [hq, n] fp32
    w = torch.sigmoid(l1 - l2).t().unsqueeze(-1)
    return (o2.float() + (o1.float() - o2.float()) * w).to(torch.bfloat16)

for n, C in [(1024, 1024), (2048, 2048), (1024, 3072), (2048, 6144), (4096, 4096), (512, 3584)]:
    qn = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
    kall = torch.randn(C + n, hkv, d, device=dev, dtype=torch.bfloat16)
    vall = torch.randn(C + n, hkv, d, device=dev, dtype=torch.bfloat16)
    flops = 4 * hq * d * (n * C + n * n / 2)
    want = ref(qn, kall, vall, C)
    cq = torch.tensor([0, n], device=dev, dtype=torch.int32)
    ck = torch.tensor([0, C + n], device=dev, dtype=torch.int32)
    def flash():
        return aten._flash_attention_forward(qn, kall, vall, cq, ck, n, C + n, 0.0, True, False, scale=scale)
    def cascade_flash():
        cc = torch.tensor([0, C], device=dev, dtype=torch.int32)
        a = aten._flash_attention_forward(qn, kall[:C], vall[:C], cq, cc, n, C, 0.0, False, False, scale=scale)
        b = aten._flash_attention_forward(qn, kall[C:], vall[C:], cq, cq, n, n, 0.0, True, False, scale=scale)
        return merge(a[0], a[1], b[0], b[1])
    qb = qn.unsqueeze(1).permute(1, 2, 0, 3)
    kb = kall.unsqueeze(1).permute(1, 2, 0, 3)
    vb = vall.unsqueeze(1).permute(1, 2, 0, 3)
    def cascade_cudnn(gqa_direct=True):
        kp, vp = kb[:, :, :C], vb[:, :, :C]
        ks_, vs_ = kb[:, :, C:], vb[:, :, C:]
        a = aten._scaled_dot_product_cudnn_attention(qb, kp, vp, None, True, 0.0, False, False, scale=scale)
        b = aten._scaled_dot_product_cudnn_attention(qb, ks_, vs_, None, True, 0.0, True, False, scale=scale)
        o1 = a[0].permute(2, 0, 1, 3)[:, 0]; o2 = b[0].permute(2, 0, 1, 3)[:, 0]
        return merge(o1, a[1].reshape(hq, n), o2, b[1].reshape(hq, n))
    outs = {"flash bottom-right": lambda: flash()[0], "cascade flash": cascade_flash}
    try:
        cascade_cudnn(); outs["cascade cudnn"] = cascade_cudnn
    except Exception as e:
        print("cascade cudnn failed:", str(e).splitlines()[0][:200])
    # the whole cost with the gather of the C cached keys from pages of 16 and the merge alone
    pages = torch.randn(4096, 16, hkv, d, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(4096, device=dev)[: (C + 15) // 16].to(torch.int32)
    gather = lambda: (pages.index_select(0, ids), pages.index_select(0, ids))
    line = f"n {n} on C {C}:"
    for name, f in outs.items():
        err = (f().float() - want).abs().max().item()
        t = timeit(f)
        line += f"  {name} {flops / t / 1e12:.0f} TFLOP/s ({t * 1e6:.0f} us, max err {err:.2e})"
    o1 = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16); l1 = torch.randn(hq, n, device=dev)
    line += f"  gather {timeit(gather) * 1e6:.0f} us  merge(ops) {timeit(lambda: merge(o1, l1, o1, l1)) * 1e6:.0f} us"
    print(line)
    # SDPA on contiguous memory, causal top-left square n+C? (reference point: the square prompt)
    sq = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
    sk = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
    t = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(sq, sk, sk, is_causal=True, enable_gqa=True))
    print(f"   sdpa square causal n {n}: {4 * hq * d * n * n / 2 / t / 1e12:.0f} TFLOP/s")
