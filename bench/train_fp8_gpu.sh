#!/usr/bin/env bash
# The GPU round of issue 12 (run from the repository root on the GPU machine; results under $OUT):
#   bench/train_fp8_gpu.sh probe   # versions, FP8 tests on the GPU, GEMMs at hidden 7168, the small BF16 model, a smoke run
#   bench/train_fp8_gpu.sh verify  # FP8 tests on the GPU, a short BF16-vs-FP8 run, the small FP8 model
#   RUNS="fp8" bench/train_fp8_gpu.sh bench          # one call: bench-moe in FP8 for BENCH_STEPS steps
#   RUNS="bf16 bf16-gamma0" bench/train_fp8_gpu.sh bench   # the next call: BF16, same steps, and gamma 0
#   bench/train_fp8_gpu.sh small   # the small FP8 model alone
#   bench/train_fp8_gpu.sh profile # step time: bf16, fp8 (grouped experts), fp8-per-expert; and the loop's additions
# then on the CPU: python bench/train_fp8.py --combine GEMMS.json FP8.json BF16.json --out RESULT.json
# Token ids come prepared (runs/tokens: tokens.npy + tokenizer.json + corpus.json, made on CPU by
# `dsv3c train --prepare` and one `--data` use), so the GPU image needs no `tokenizers`.
set -u
MODE=$1; COMMIT=${2:-unknown}; SMALL_STEPS=${SMALL_STEPS:-600}; BENCH_STEPS=${BENCH_STEPS:-150}; GAMMA0_STEPS=${GAMMA0_STEPS:-80}
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/pkg "$OUT" && ln -sfn "$PWD" /tmp/pkg/dsv3c && export PYTHONPATH=/tmp/pkg
small() {  # small PRECISION: the CPU-evaluable model, brought back as <=16 MB shards + one tar of the rest
  local p=$1
  python -m dsv3c train --preset eval-small --data runs/tokens --out /tmp/small-$p --precision $p --device cuda \
    --steps "$SMALL_STEPS" --batch-size 32 --seq-len 512 --lr 3e-3 --warmup-steps 50 --val-every 100 \
    --save-every 100000 --shard-mb 15 --quiet 2>&1 | tail -3
  mkdir -p "$OUT/small-$p"
  cp /tmp/small-$p/model-*.safetensors /tmp/small-$p/model.safetensors "$OUT/small-$p/" 2>/dev/null
  tar -C /tmp/small-$p -cf "$OUT/small-$p/meta.tar" config.json tokenizer.json generation_config.json training.json \
    metrics.jsonl .dsv3c $(cd /tmp/small-$p && ls model.safetensors.index.json curves.png 2>/dev/null)
}
if [ "$MODE" = verify ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 330 bash -c "$(declare -f small); OUT=$OUT; SMALL_STEPS=$SMALL_STEPS; small fp8"
  python - <<'PY'
import json
rows = [json.loads(line) for line in open("/tmp/small-fp8/metrics.jsonl")]
for r in rows[:: max(1, len(rows) // 8)] + rows[-1:]:
    print({k: r.get(k) for k in ("step", "loss", "lm_loss", "val_loss", "tokens_per_s", "load_max_mean")})
PY
  timeout 110 python -m pytest tests/test_train_fp8.py -q -x -p no:cacheprovider 2>&1 | grep -v Warn | tail -4; echo "pytest rc=$?"
  timeout 150 python bench/train_fp8.py --skip-gemm --data runs/tokens --steps "${SMOKE_STEPS:-40}" --gamma0-steps 0 \
    --commit "$COMMIT" --out "$OUT/smoke.json" 2>&1 | grep -v curve | tail -8
elif [ "$MODE" = probe ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, sys; print(torch.__version__, sys.version.split()[0])"
  python -c "import tokenizers" 2>&1 | tail -1; python -c "import matplotlib" 2>&1 | tail -1; python -c "import rich, safetensors, numpy" 2>&1 | tail -1
  timeout 120 python -m pytest tests/test_train_fp8.py -q -x -p no:cacheprovider 2>&1 | tail -4
  timeout 150 python bench/train_fp8.py --skip-train --commit "$COMMIT" --out "$OUT/gemm.json" 2>&1 | tail -7
  timeout 200 python bench/train_fp8.py --skip-gemm --data runs/tokens --steps 12 --gamma0-steps 0 --commit "$COMMIT" \
    --out "$OUT/smoke.json" 2>&1 | grep -v curve | tail -8
  SMALL_STEPS=${SMALL_STEPS} timeout 200 bash -c "$(declare -f small); OUT=$OUT; small bf16"
elif [ "$MODE" = profile ]; then
  timeout 200 python bench/train_step_profile.py --commit "$COMMIT" --out "$OUT/train_step_profile.json" 2>&1 | grep -v "^W1201" | tail -60
  timeout 200 python bench/train_step_profile.py --loop-variants --precisions bf16 fp8 --commit "$COMMIT" \
    --out "$OUT/train_loop_variants.json" 2>&1 | grep -v "^W1201" | tail -10
elif [ "$MODE" = small ]; then
  timeout 330 bash -c "$(declare -f small); OUT=$OUT; SMALL_STEPS=$SMALL_STEPS; small fp8"
else
  RUNS=${RUNS:-bf16 fp8 bf16-gamma0}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout "${BENCH_LIMIT:-540}" python bench/train_fp8.py --skip-gemm --runs $RUNS --data runs/tokens \
    --steps "$BENCH_STEPS" --gamma0-steps "$GAMMA0_STEPS" --commit "$COMMIT" --out "$OUT/train_fp8_${RUNS// /_}.json" 2>&1 \
    | grep -v curve | tail -12
  # a run cut off by the time limit still brings back its curve
  for d in /tmp/train-fp8-bench/*/; do [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/$(basename "$d")-metrics.jsonl"; done
fi
ls -la "$OUT" "$OUT"/*/ 2>/dev/null
