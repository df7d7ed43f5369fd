"""libtorch's packed (ragged) attention forwards on a GPU: cuDNN's `_cudnn_attention_forward`
with cumulative sequence offsets (int32 and int64) against the variable-length flash forward,
causal, 32/8 heads, head dimension 128, bf16. Prints, per list of prompt lengths, each kernel's
largest error against attention in fp32 (-1 where the reference is skipped) and its TFLOP/s
(mean of 20 calls after 3 warm-up calls). Run with the GPU machine's python3 (PyTorch 2.11).
The result decided that `paged-attention-cuda` sends several prompts to flash, not cuDNN.
"""
import torch, time
torch.manual_seed(0)
dev='cuda'
hq,hkv,hd=32,8,128
def ref(q,k,v,lens,scale):
    outs=[];s=0
    for l in lens:
        qq=q[s:s+l].transpose(0,1).float(); kk=k[s:s+l].transpose(0,1).float().repeat_interleave(hq//hkv,0); vv=v[s:s+l].transpose(0,1).float().repeat_interleave(hq//hkv,0)
        a=(qq@kk.transpose(1,2))*scale
        m=torch.ones(l,l,dtype=torch.bool,device=dev).triu(1)
        a=a.masked_fill(m,float('-inf')).softmax(-1)
        outs.append((a@vv).transpose(0,1)); s+=l
    return torch.cat(outs,0)
def bench(f,iters=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(iters): f()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/iters
for lens in [[300,130,77],[90,200,64],[1024]*4,[256]*16,[64]*64,[4096]]:
    T=sum(lens); scale=1/hd**0.5
    q=torch.randn(T,hq,hd,device=dev,dtype=torch.bfloat16); k=torch.randn(T,hkv,hd,device=dev,dtype=torch.bfloat16); v=torch.randn(T,hkv,hd,device=dev,dtype=torch.bfloat16)
    cu=torch.tensor([0]+list(torch.tensor(lens).cumsum(0)),device=dev,dtype=torch.int32)
    mx=max(lens)
    r=ref(q,k,v,lens,scale) if T<=5000 else None
    res={}
    for name,dt in [('cudnn-i32',torch.int32),('cudnn-i64',torch.int64)]:
        try:
            c=cu.to(dt)
            f=lambda: torch.ops.aten._cudnn_attention_forward(q,k,v,None,c,c,mx,mx,False,0.0,True,False,scale=scale)[0]
            o=f(); err=(o.float()-r).abs().max().item() if r is not None else -1
            t=bench(f); res[name]=(err,t)
        except Exception as e:
            res[name]=('ERR '+str(e).split('\n')[0][:150],)
    f=lambda: torch.ops.aten._flash_attention_forward(q,k,v,cu,cu,mx,mx,0.0,True,False,scale=scale)[0]
    o=f(); err=(o.float()-r).abs().max().item() if r is not None else -1
    res['flash']=(err,bench(f))
    flops=sum(2*hq*l*l*hd for l in lens)
    print(lens[:3],len(lens), {k:(v if len(v)==1 else (round(v[0],4), round(flops/v[1]/1e12,1))) for k,v in res.items()})
