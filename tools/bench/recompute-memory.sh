#!/usr/bin/env bash
# Selective recompute of core attention: peak memory of one training step (forward + backward)
# with and without it, at a sequence length where the attention probabilities dominate.
# Each configuration runs in its own process (the CPU measure is the process's peak RSS).
# Usage: tools/bench/recompute-memory.sh [--device cuda] [--seq-len N] [--num-layers L] ...
# (defaults: --steps 2 --batch 1 --seq-len 2048 --num-layers 6; $ATTN picks the binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
attn=${ATTN:-target/release/attn}
[ -x "$attn" ] || cargo build --quiet --release -p attention-cli
# Defaults, each replaced by the same flag given on the command line.
args=("$@")
for default in "--steps 2" "--batch 1" "--seq-len 2048" "--num-layers 6"; do
  flag=${default%% *}
  [[ " $* " == *" $flag "* ]] || args+=($default)
done
printf '%-10s %14s %10s\n' mode "peak MiB" "ms/step"
for mode in plain recompute; do
  extra=()
  [ "$mode" = recompute ] && extra=(--recompute)
  out=$("$attn" train-step --json "${args[@]}" "${extra[@]}")
  python3 - "$mode" "$out" <<'PY'
import json, sys
mode, out = sys.argv[1], json.loads(sys.argv[2])
last = out["steps"][-1]
print(f"{mode:<10} {last['peak_memory_bytes'] / 2**20:14.1f} {last['ms']:10.1f}")
PY
done
