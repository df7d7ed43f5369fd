"""Writes Megatron-Core 0.19.2 attention fixtures (see README.md beside this file).

Every case builds Megatron's own SelfAttention / CrossAttention from its local spec on CPU in
fp32, re-randomises the weights with a visible scale, runs forward and backward of
loss = sum((output + bias) * grad_output) and writes `case.toml` + `tensors.safetensors`.
"""

import argparse
import contextlib
import os
import shutil
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

# --- CPU patches: three Megatron helpers assume CUDA -------------------------------------
torch.cuda.current_device = lambda: "cpu"  # device of buffers (global memory buffer, rotary)

import megatron.core.transformer.utils as mutils  # noqa: E402
import megatron.core.fusions.fused_softmax as fused_softmax  # noqa: E402


def _causal_mask_cpu(sq):
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


mutils.get_default_causal_mask = _causal_mask_cpu
fused_softmax.get_default_causal_mask = _causal_mask_cpu

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402


class _NoFork:
    @contextlib.contextmanager
    def fork(self, *args, **kwargs):
        yield


import megatron.core.tensor_parallel as mtp  # noqa: E402

# The model-parallel RNG tracker's fork (used around attention dropout; dropout is 0 here).
mrandom.get_cuda_rng_tracker = lambda *a, **k: _NoFork()
mtp.get_cuda_rng_tracker = mrandom.get_cuda_rng_tracker

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
import megatron.core.package_info as package_info  # noqa: E402

# From a wheel unzipped inside a git checkout the version carries that checkout's commit.
MEGATRON_VERSION = package_info.__version__.split("+")[0]

MASK_TYPES = {
    "causal": AttnMaskType.causal,
    "padding": AttnMaskType.padding,
    "no_mask": AttnMaskType.no_mask,
    "padding_causal": AttnMaskType.padding_causal,
    "arbitrary": AttnMaskType.arbitrary,
}

# Every case: name, attention type, layer number, mask type, batch, seq_len, kv_seq_len,
# rotary (None or (percent, base)), optional per-sequence lengths for padding masks, and the
# TransformerConfig fields (by Megatron name) that differ from the class defaults.
BASE = dict(hidden_size=64, num_attention_heads=4, attention_dropout=0.0)
CASES = [
    dict(name="mha_causal", mask="causal", b=2, s=8, cfg={}),
    dict(name="gqa_causal", mask="causal", b=2, s=8, cfg=dict(num_attention_heads=8, num_query_groups=2)),
    dict(name="mqa_causal", mask="causal", b=2, s=8, cfg=dict(num_attention_heads=4, num_query_groups=1)),
    dict(name="kv_channels_ne_hidden", mask="causal", b=2, s=7, cfg=dict(hidden_size=48, kv_channels=16, num_attention_heads=4, num_query_groups=2)),
    dict(name="qk_layernorm", mask="causal", b=2, s=8, cfg=dict(num_attention_heads=8, num_query_groups=4, qk_layernorm=True, normalization="LayerNorm")),
    dict(name="qk_rmsnorm", mask="causal", b=2, s=8, cfg=dict(num_attention_heads=8, num_query_groups=2, qk_layernorm=True, normalization="RMSNorm", layernorm_epsilon=1e-6)),
    dict(name="qk_l2_norm", mask="causal", b=2, s=8, cfg=dict(qk_l2_norm=True, layernorm_epsilon=1e-6)),
    dict(name="qkv_bias_only", mask="causal", b=2, s=8, cfg=dict(add_bias_linear=False, add_qkv_bias=True)),
    dict(name="no_bias", mask="causal", b=2, s=8, cfg=dict(add_bias_linear=False)),
    dict(name="softmax_scale", mask="causal", b=2, s=8, cfg=dict(softmax_scale=0.3)),
    dict(name="layer_scaling_l3", mask="causal", b=2, s=8, layer=3, cfg=dict(apply_query_key_layer_scaling=True)),
    dict(name="layer_scaling_scale_l5", mask="causal", b=1, s=6, layer=5, cfg=dict(apply_query_key_layer_scaling=True, softmax_scale=0.2)),
    dict(name="softmax_fp32_off", mask="causal", b=2, s=8, cfg=dict(attention_softmax_in_fp32=False)),
    dict(name="mask_padding", mask="padding", b=3, s=8, lengths=[8, 5, 2], cfg={}),
    dict(name="mask_padding_causal", mask="padding_causal", b=3, s=8, lengths=[8, 6, 3], cfg={}),
    dict(name="mask_arbitrary", mask="arbitrary", b=2, s=8, cfg={}),
    dict(name="mask_no_mask", mask="no_mask", b=2, s=8, cfg={}),
    dict(name="gqa_padding_uneven", mask="padding", b=4, s=9, lengths=[9, 1, 4, 7], cfg=dict(num_attention_heads=8, num_query_groups=2)),
    dict(name="rope", mask="causal", b=2, s=8, rotary=(1.0, 10000), cfg={}),
    dict(name="rope_interleaved", mask="causal", b=2, s=8, rotary=(1.0, 10000), cfg=dict(rotary_interleaved=True)),
    dict(name="rope_percent_half", mask="causal", b=2, s=8, rotary=(0.5, 10000), cfg={}),
    dict(name="rope_interleaved_percent", mask="causal", b=2, s=8, rotary=(0.5, 500000), cfg=dict(rotary_interleaved=True, num_attention_heads=8, num_query_groups=2)),
    dict(name="qwen_like", mask="causal", b=2, s=10, rotary=(1.0, 1000000), cfg=dict(hidden_size=64, num_attention_heads=8, num_query_groups=2, kv_channels=16, qk_layernorm=True, normalization="RMSNorm", layernorm_epsilon=1e-6, add_bias_linear=False, add_qkv_bias=True)),
    dict(name="cross_no_padding", attention="cross", mask="arbitrary", b=2, s=6, skv=9, cfg={}),
    dict(name="cross_padding", attention="cross", mask="padding", b=3, s=6, skv=9, lengths=[9, 4, 1], cfg={}),
    dict(name="cross_no_bias_scale", attention="cross", mask="no_mask", b=2, s=5, skv=3, cfg=dict(add_bias_linear=False, softmax_scale=0.5)),
]


def make_mask(case, b, sq, skv, gen):
    mask_type = case["mask"]
    if mask_type in ("causal", "no_mask") or (case.get("attention") == "cross" and "lengths" not in case and mask_type == "arbitrary"):
        return None
    if mask_type == "arbitrary":
        m = torch.rand(b, 1, sq, skv, generator=gen) < 0.3
        m[0, 0, 1, :] = True  # one fully masked row
        return m
    lengths = case["lengths"]
    keys = torch.arange(skv)[None, :] >= torch.tensor(lengths)[:, None]  # [b, skv]
    m = keys[:, None, None, :].expand(b, 1, sq, skv).clone()
    if case.get("attention") != "cross":
        queries = torch.arange(sq)[None, :] >= torch.tensor(lengths)[:, None]  # [b, sq]
        m |= queries[:, None, :, None]
    if mask_type == "padding_causal":
        m |= torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=1)[None, None]
    return m


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def run_case(case, out_dir, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cross = case.get("attention") == "cross"
    cfg_fields = {**BASE, **case["cfg"]}
    config = TransformerConfig(num_layers=max(case.get("layer", 1), 1), use_cpu_initialization=True, **cfg_fields)
    mask_type = MASK_TYPES[case["mask"]]
    layer = case.get("layer", 1)
    if cross:
        spec = ModuleSpec(
            module=CrossAttention,
            params={"attn_mask_type": mask_type},
            submodules=CrossAttentionSubmodules(
                linear_q=ColumnParallelLinear,
                linear_kv=ColumnParallelLinear,
                core_attention=DotProductAttention,
                linear_proj=RowParallelLinear,
            ),
        )
    else:
        layer_spec = get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm,
            normalization=config.normalization,
            qk_l2_norm=config.qk_l2_norm,
        )
        spec = layer_spec.submodules.self_attention
        spec = ModuleSpec(module=spec.module, params={**spec.params, "attn_mask_type": mask_type}, submodules=spec.submodules)
    attn = build_module(spec, config=config, layer_number=layer)
    attn.train()

    # Visible weights (Megatron's init, std 0.02, leaves the scores near zero): query/key/value
    # projections N(0, 1.5^2 / fan_in), so logits have a spread of a few units and the softmax
    # is neither flat nor one-hot; the output projection N(0, 1 / fan_in); biases N(0, 0.1^2);
    # norm weights 1 + N(0, 0.1^2). Activations and gradients stay O(1)-O(10), where fp32
    # rounding stays well under the fixtures' atol of 1e-5.
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight") else 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = (1.0 if name.startswith("linear_proj") else 1.5) / p.shape[1] ** 0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))

    b, sq = case["b"], case["s"]
    skv = case.get("skv", sq)
    h = config.hidden_size
    hidden = torch.randn(sq, b, h, generator=gen).requires_grad_()
    kv = torch.randn(skv, b, h, generator=gen).requires_grad_() if cross else None
    mask = make_mask(case, b, sq, skv, gen)
    rotary = case.get("rotary")
    rope = None
    if rotary is not None:
        rope_mod = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=rotary[0],
            rotary_interleaved=config.rotary_interleaved,
            rotary_base=rotary[1],
            use_cpu_initialization=True,
        )
        rope = rope_mod(sq)
    grad_output = torch.randn(sq, b, h, generator=gen)

    out, bias = attn(hidden, mask, key_value_states=kv, rotary_pos_emb=rope)
    total = out + bias if bias is not None else out
    (total * grad_output).sum().backward()

    tensors = {}
    for name, p in attn.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        tensors[f"weight.{name}"] = p.detach().clone().contiguous()
    tensors["input.hidden_states"] = hidden.detach().clone()
    if cross:
        tensors["input.key_value_states"] = kv.detach().clone()
    if mask is not None:
        tensors["input.attention_mask"] = mask.contiguous()
    if rope is not None:
        tensors["input.rotary_pos_emb"] = rope.detach().clone().contiguous()
    tensors["input.grad_output"] = grad_output
    tensors["expected.output"] = out.detach().clone().contiguous()
    if bias is not None:
        tensors["expected.bias"] = bias.detach().clone().contiguous()
    tensors["expected.grad.hidden_states"] = hidden.grad.clone()
    if cross:
        tensors["expected.grad.key_value_states"] = kv.grad.clone()
    for name, p in attn.named_parameters():
        tensors[f"expected.grad.weight.{name}"] = p.grad.detach().clone().contiguous()

    case_dir = os.path.join(out_dir, case["name"])
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    save_file(tensors, os.path.join(case_dir, "tensors.safetensors"))
    lines = [
        f"# Megatron-Core {MEGATRON_VERSION} {'CrossAttention' if cross else 'SelfAttention'}, local spec, CPU fp32.",
        "# Written by tools/megatron-golden/generate.py; do not edit.",
        "[case]",
        f'attention = "{"cross" if cross else "self"}"',
        f"layer_number = {layer}",
        f'attn_mask_type = "{case["mask"]}"',
        f"batch = {b}",
        f"seq_len = {sq}",
        f"kv_seq_len = {skv}",
    ]
    if rotary is not None:
        lines += [f"rotary_percent = {float(rotary[0])}", f"rotary_base = {float(rotary[1])}"]
    lines += ["atol = 1e-5", "rtol = 1e-4", "", "[transformer]"]
    for k, v in cfg_fields.items():
        lines.append(f"{k} = {toml_value(v)}")
    with open(os.path.join(case_dir, "case.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return case_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--only", nargs="*", help="case names to (re)generate")
    args = ap.parse_args()
    assert MEGATRON_VERSION == "0.19.2", package_info.__version__
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    for i, case in enumerate(CASES):
        if args.only and case["name"] not in args.only:
            continue
        print(run_case(case, args.out_dir, seed=1000 + i))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
