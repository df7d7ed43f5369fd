"""Writes the Qwen3 decoder fixture of examples/qwen3 with Hugging Face transformers.

A small Qwen3ForCausalLM (2 layers, hidden 256, 8 query heads, 2 key/value heads, head_dim 32,
rotary theta 1e6, SwiGLU MLP, untied embeddings, vocabulary 512) is created from a config with
a fixed seed (no download), saved as safetensors, and for a few prompts of different lengths
the greedy continuation of 32 tokens and the raw logits of every `generate` step are recorded.

Run: HF_HUB_OFFLINE=1 .venv/bin/python tools/hf-reference/qwen3_fixture.py examples/qwen3/fixtures
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

NEW_TOKENS = 32
PROMPT_LENGTHS = [3, 11, 27, 40]


def main(out_dir):
    torch.manual_seed(1234)
    config = Qwen3Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        # A visible scale (the default 0.02 makes every logit nearly equal).
        initializer_range=0.08,
        pad_token_id=0,
        dtype=torch.float32,
    )
    model = Qwen3ForCausalLM(config).eval()
    # Norm weights start at one; make them visible so a mix-up of norms cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_string()), f, indent=2, sort_keys=True)

    gen = torch.Generator().manual_seed(99)
    tensors = {}
    for i, n in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(0, config.vocab_size, (1, n), generator=gen)
        with torch.no_grad():
            out = model.generate(
                prompt,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tensors[f"prompt.{i}"] = prompt[0].clone()
        tensors[f"tokens.{i}"] = out.sequences[0, n:].clone()
        tensors[f"logits.{i}"] = torch.stack([l[0] for l in out.logits]).float().contiguous()
        assert tensors[f"tokens.{i}"].numel() == NEW_TOKENS
    save_file(tensors, os.path.join(out_dir, "generation.safetensors"))
    print({k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/qwen3/fixtures")
