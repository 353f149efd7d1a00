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

step "2. load it and generate 16 tokens greedily over the latent cache (PyTorch)"
dsv3c generate "$OUT/ckpt" --prompt-ids 1,2,3,4 --max-new-tokens 16

step "3. export: prefill, decode (over the latent cache) and MTP graphs with MLA and MoE custom nodes"
dsv3c export "$OUT/ckpt" --out "$OUT/export"

step "4. the same generation with onnxruntime on the exported graphs, then with MTP speculative decoding"
dsv3c generate "$OUT/export" --prompt-ids 1,2,3,4 --max-new-tokens 16
dsv3c generate "$OUT/export" --prompt-ids 1,2,3,4 --prompt-ids 9,8 --max-new-tokens 16 --mtp --json

step "5. FP8 quantization the DeepSeek way (128x128 weight blocks, 1x128 activation tiles), error report"
dsv3c quantize "$OUT/export" --out "$OUT/fp8" --report

step "6. lowering: onnxruntime (com.microsoft.MoE) and TensorRT (opset-23 Attention/RotaryEmbedding)"
dsv3c lower "$OUT/fp8" --target ort --out "$OUT/fp8-ort"
dsv3c generate "$OUT/fp8-ort" --prompt-ids 1,2,3,4 --max-new-tokens 16
if "$BIN/python" -c "import tensorrt_rtx" 2>/dev/null || "$BIN/python" -c "import tensorrt" 2>/dev/null; then
  step "7. TensorRT engines, built ahead of time without a GPU, and what they hold"
  dsv3c quantize "$OUT/export" --out "$OUT/fp8-static" --calibrate 4
  dsv3c build "$OUT/fp8-static" --out "$OUT/engines" --precision fp8
  dsv3c inspect "$OUT/engines" --target-cc 8.9
else
  step "7. skipped: no TensorRT installed (pip install '.[tensorrt]' for TensorRT-RTX)"
fi

step "8. what quantization changed: a structural diff with per-layer numbers (exit 1: differences found)"
status=0
dsv3c diff "$OUT/export" "$OUT/fp8" --numeric --format html --out "$OUT/diff.html" || status=$?
[ "$status" -eq 1 ] || exit "$status"
dsv3c diff "$OUT/export" "$OUT/fp8" | head -n 30 || true
echo "full report: $OUT/diff.html"
