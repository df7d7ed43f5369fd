#!/usr/bin/env bash
# Regenerates the Megatron-Core 0.19.2 fixtures in attention-tests/fixtures/megatron.
#
# Megatron-Core 0.19.2 declares Python >= 3.12, but its cp312 wheel, unzipped onto PYTHONPATH,
# imports and runs on Python 3.11 with torch 2.11.0 (the project's .venv), einops, packaging,
# numpy and safetensors. The wheel is downloaded into target/megatron-golden (git-ignored).
# Usage: tools/megatron-golden/run.sh [--only CASE...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo xtask setup
py="$root/.venv/bin/python"
work="$root/target/megatron-golden"
mkdir -p "$work"
if [ ! -d "$work/src/megatron" ]; then
  "$py" -m pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: \
    megatron-core==0.19.2 -d "$work"
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$(ls "$work"/megatron_core-0.19.2-*.whl)" "$work/src"
fi
"$py" -m pip install --quiet einops packaging numpy safetensors
PYTHONPATH="$work/src" "$py" tools/megatron-golden/generate.py attention-tests/fixtures/megatron "$@"
