#!/usr/bin/env bash
# make demo: the main job end to end on the built-in tiny preset.
set -euo pipefail
BIN=$1
OUT=$2
dsv3c() { "$BIN/dsv3c" "$@"; }
step() { printf '\n== %s\n' "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"

step "1. a random tiny checkpoint (FP8 weights with 128x128 block scales, as DeepSeek ships V3)"
dsv3c init --preset tiny --out "$OUT/ckpt" --dtype fp8 --seed 0

step "2. load it and generate 16 tokens greedily with the latent cache (PyTorch)"
dsv3c generate "$OUT/ckpt" --prompt-ids 1,2,3,4 --max-new-tokens 16

step "3. a batch of two prompts, as JSON"
dsv3c generate "$OUT/ckpt" --prompt-ids 5,6,7 --prompt-ids 8,9 --max-new-tokens 8 --json

step "4. export: prefill, decode (over the latent cache) and MTP graphs with MLA and MoE custom nodes"
dsv3c export "$OUT/ckpt" --out "$OUT/export"

step "5. what the export holds"
dsv3c inspect "$OUT/export"
