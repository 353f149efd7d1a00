#!/usr/bin/env bash
# The GPU round of issue 14, in few device calls (results under $OUT):
#   bench/decode_gpu.sh folders          # here, on the CPU: weightless export folders under runs/gpu (~12 MB)
# then on the GPU machine, with onnxruntime-gpu staged at /tmp/site and runs/gpu carried:
#   bench/decode_gpu.sh small COMMIT     # small fp32: every runtime, and the kernels of one step
#   bench/decode_gpu.sh small-ablations COMMIT   # the fusions' and the split attention's effect
#   bench/decode_gpu.sh capture COMMIT   # V2-Lite's batch-32 capture settings, and the cache writes' effect
#   bench/decode_gpu.sh apart COMMIT     # then: V2-Lite with its shared experts as MatMuls, and 8-bit
#   bench/decode_gpu.sh v2-lite COMMIT   # V2-Lite shapes, bf16 and 8-bit: ort-graph vs PyTorch and transformers
#   bench/decode_gpu.sh cut COMMIT       # V2-Lite bf16 ort-graph and its step's kernels (this lowering)
#   bench/decode_gpu.sh cut-before COMMIT BEFORE   # then folders lowered at BEFORE (`*-before`), small, 8-bit
#   bench/decode_gpu.sh eight-bit COMMIT BEFORE  # 8-bit V2-Lite now, shared experts apart, lowered at BEFORE
#     (runs/gpu/v2-lite-8bit-before: `lower --weights-8bit` from a checkout of BEFORE, e.g. a git worktree)
#   bench/decode_gpu.sh grid COMMIT      # V2-Lite bf16: ort-graph, PyTorch eager, transformers at 128/1024/4096
#   bench/decode_gpu.sh long COMMIT      # V2-Lite bf16 at 16384, the Concat form, the kernels at 4096
#   bench/decode_gpu.sh experts COMMIT   # V2-Lite with 8-bit experts only, beside all 8-bit and bf16
#   bench/decode_gpu.sh in-place COMMIT  # V2-Lite bf16, cache written in place (the default) beside `apart`
#   bench/decode_gpu.sh half-softmax COMMIT  # the 16-bit Softmax's check, a V2-Lite step's kernels, 8-bit experts
#   bench/decode_gpu.sh rope-softmax COMMIT  # V2-Lite bf16 now beside runs/gpu/v2-lite-before, every batch
#   bench/decode_gpu.sh kernel-routing COMMIT  # the CUDA MoE kernels' routing contract, a V2-Lite step's kernels
#   bench/decode_gpu.sh static-transposes COMMIT  # V2-Lite with the size-1 Transposes as Reshapes or kept, router GEMMs
#   bench/decode_gpu.sh qmoe-blocks COMMIT  # the MoE kernels' contract at QMoE's blocks and V2-Lite's shapes, 8-bit experts
#   bench/decode_gpu.sh qmoe-packed COMMIT  # QMoE packed at session load: logits against bf16, contract, 8-bit experts
#   bench/decode_gpu.sh eight-bit-packed COMMIT  # V2-Lite 8-bit experts, all 8-bit and bf16, QMoE packed; packing time
#   bench/decode_gpu.sh norms-scale COMMIT  # V2-Lite bf16 now beside runs/gpu/v2-lite-before with plain norms; kernels
#   bench/decode_gpu.sh experts-now COMMIT  # V2-Lite 8-bit experts (packed) beside bf16 at batch 1, 8 and 32
#   bench/decode_gpu.sh qmoe-routing COMMIT  # QMoE's routing in the CUDA kernel: logits, V2-Lite 8-bit experts A/B
# A `--weights none` folder is filled with random weights on the GPU by bench/gpu_decode.py.
set -u
MODE=$1; COMMIT=${2:-unknown}; OUT=${OUT:-/tmp/out}; DIR=runs/gpu
if [ "$MODE" = folders ]; then
  set -e; mkdir -p $DIR
  python -m dsv3c export --preset small --weights none --out $DIR/small-canon --force
  python -m dsv3c lower $DIR/small-canon --target ort --out $DIR/small --force
  python -m dsv3c export --preset v2-lite --weights none --dtype bf16 --out $DIR/v2-lite-canon --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --out $DIR/v2-lite --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --weights-8bit --out $DIR/v2-lite-8bit --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --shared-experts-apart --out $DIR/v2-lite-apart --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --weights-8bit --shared-experts-apart \
    --out $DIR/v2-lite-8bit-apart --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --decode-cache concat --out $DIR/v2-lite-concat --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --weights-8bit --weights-8bit-scope experts \
    --out $DIR/v2-lite-8bit-experts --force
  python -m dsv3c lower $DIR/v2-lite-canon --target ort --decode-cache apart --out $DIR/v2-lite-cache-apart --force
  rm -rf $DIR/small-canon $DIR/v2-lite-canon
  du -sh $DIR
  exit 0
fi
mkdir -p /tmp/pkg "$OUT" && ln -sfn "$PWD" /tmp/pkg/dsv3c && export PYTHONPATH=/tmp/site:/tmp/pkg
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
if [ "$MODE" = small ]; then
  timeout 300 python bench/gpu_decode.py $DIR/small --runtimes ort-graph ort-static torch transformers \
    --contexts 128 4096 --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_small.json" 2>&1 | tail -32
  for b in 1 8; do
    timeout 60 python bench/gpu_step_kernels.py $DIR/small --batch $b --commit "$COMMIT" --top 20 \
      --out "$OUT/gpu_step_kernels_small_b$b.json" 2>&1 | tail -22
  done
elif [ "$MODE" = capture ]; then
  # batch 32's capture: which session settings make it work; then V2-Lite's ort-graph rows with them, and
  # the kernels of a step with the new cache entries stored by two scatters against two per layer
  timeout 200 python bench/capture_variants.py $DIR/v2-lite --batch 32 --commit "$COMMIT" \
    --out "$OUT/capture_variants_v2-lite_b32.json" 2>&1 | grep -v Warning | tee /tmp/capture.txt | tail -8
  S=$(sed -n 's/^works: //p' /tmp/capture.txt); { [ -z "$S" ] || [ "$S" = none ]; } && S=default
  echo "$S" > /tmp/capture_settings
  timeout 150 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph --capture-settings "$S" --contexts 128 4096 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite_ort_graph.json" 2>&1 | tail -9
  timeout 100 python bench/gpu_step_kernels.py $DIR/v2-lite --batch 1 --rounds 5 --top 12 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite_b1.json" 2>&1 | grep -v -i warn | tail -14
  rm -f $DIR/v2-lite/weights.bin; df -h /tmp | tail -1  # room for the next folder's weights
elif [ "$MODE" = apart ]; then
  # the shared experts as MatMuls (lower --shared-experts-apart), and the 8-bit V2-Lite, with the same settings
  S=$(cat /tmp/capture_settings 2>/dev/null || echo default)
  timeout 130 python bench/gpu_decode.py $DIR/v2-lite-apart --runtimes ort-graph --capture-settings "$S" \
    --contexts 128 4096 --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-apart.json" 2>&1 | tail -6
  rm -f $DIR/v2-lite-apart/weights.bin
  timeout 130 python bench/gpu_decode.py $DIR/v2-lite-8bit --runtimes ort-graph --capture-settings "$S" \
    --contexts 128 4096 --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit.json" 2>&1 | tail -9
  timeout 60 python bench/gpu_step_kernels.py $DIR/small --batch 1 --rounds 5 --top 8 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_small_b1.json" 2>&1 | grep -v -i warn | tail -10
elif [ "$MODE" = cut ]; then
  # fewer kernels per step: V2-Lite bf16 lowered now, every batch, and the kernels of its batch-1 step
  timeout 260 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph --contexts 128 4096 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite_ort_graph.json" 2>&1 | tail -9
  timeout 150 python bench/gpu_step_kernels.py $DIR/v2-lite --batch 1 --rounds 5 --top 40 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite_b1.json" 2>&1 | grep -v -i warn | tail -30
  rm -f $DIR/v2-lite/weights.bin; df -h /tmp | tail -1
elif [ "$MODE" = cut-before ]; then
  # then, side by side in one call: V2-Lite now and lowered at BEFORE (`*-before`), small both ways, 8-bit
  BEFORE=${3:-unknown}
  timeout 170 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph --contexts 128 4096 \
    --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-after.json" 2>&1 | tail -6
  rm -f $DIR/v2-lite/weights.bin
  timeout 170 python bench/gpu_decode.py $DIR/v2-lite-before --runtimes ort-graph --contexts 128 4096 \
    --batches 1 8 --steps 24 --commit "$BEFORE" --out "$OUT/gpu_decode_v2-lite-before.json" 2>&1 | tail -6
  rm -f $DIR/v2-lite-before/weights.bin
  for f in small small-before; do
    c=$COMMIT; [ $f = small-before ] && c=$BEFORE
    timeout 90 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 --batches 1 8 32 \
      --steps 24 --commit "$c" --out "$OUT/gpu_decode_$f.json" 2>&1 | tail -8
  done
  timeout 170 python bench/gpu_decode.py $DIR/v2-lite-8bit --runtimes ort-graph --contexts 128 4096 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit.json" 2>&1 | tail -9
elif [ "$MODE" = eight-bit ]; then
  # 8-bit V2-Lite: shared experts in QMoE and MatMulNBits merged (the default), shared experts as
  # MatMulNBits (`*-apart`), and lowered at BEFORE (`*-before`), in one call
  BEFORE=${3:-unknown}
  timeout 150 python bench/gpu_step_kernels.py $DIR/v2-lite-8bit --batch 1 --rounds 5 --top 30 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite-8bit_b1.json" 2>&1 | grep -v -i warn | tail -22
  timeout 200 python bench/gpu_decode.py $DIR/v2-lite-8bit --runtimes ort-graph --contexts 128 1024 4096 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit.json" 2>&1 | tail -11
  rm -f $DIR/v2-lite-8bit/weights.bin
  for f in v2-lite-8bit-apart v2-lite-8bit-before; do
    c=$COMMIT; [ $f = v2-lite-8bit-before ] && c=$BEFORE
    timeout 120 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 \
      --batches 1 8 --steps 24 --commit "$c" --out "$OUT/gpu_decode_$f.json" 2>&1 | tail -6
    rm -f $DIR/$f/weights.bin
  done
  df -h /tmp | tail -1
elif [ "$MODE" = grid ]; then
  # every runtime side by side, the README's V2-Lite table
  timeout 560 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph torch transformers \
    --contexts 128 1024 4096 --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite.json" 2>&1 | tail -30
  rm -f $DIR/v2-lite/weights.bin
elif [ "$MODE" = long ]; then
  # context 16384 against the cache bytes; the exported Concat of the cache against attention over it apart
  timeout 200 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph --contexts 128 4096 16384 \
    --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite_long.json" 2>&1 | tail -8
  timeout 120 python bench/gpu_step_kernels.py $DIR/v2-lite --batch 1 --capacity 4096 --rounds 3 --top 30 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite_b1_4096.json" 2>&1 | grep -v -i warn | tail -22
  rm -f $DIR/v2-lite/weights.bin
  timeout 170 python bench/gpu_decode.py $DIR/v2-lite-concat --runtimes ort-graph --contexts 128 4096 \
    --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-concat.json" 2>&1 | tail -6
  rm -f $DIR/v2-lite-concat/weights.bin
elif [ "$MODE" = experts ]; then
  # 8-bit experts with bf16 linears (`--weights-8bit-scope experts`), beside all 8-bit and bf16, in one call
  timeout 120 python bench/gpu_step_kernels.py $DIR/v2-lite-8bit-experts --batch 1 --rounds 5 --top 20 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite-8bit-experts_b1.json" 2>&1 | grep -v -i warn | tail -14
  timeout 200 python bench/gpu_decode.py $DIR/v2-lite-8bit-experts --runtimes ort-graph --contexts 128 1024 4096 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit-experts.json" 2>&1 | tail -11
  rm -f $DIR/v2-lite-8bit-experts/weights.bin
  for f in v2-lite-8bit v2-lite; do
    timeout 130 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 \
      --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_$f-beside.json" 2>&1 | tail -6
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = in-place ]; then
  # the cache written in place by the graph (the default) beside `--decode-cache apart`, in one call
  timeout 100 python bench/gpu_step_kernels.py $DIR/v2-lite --batch 1 --rounds 5 --top 30 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite-inplace_b1.json" 2>&1 | grep -v -i warn | tail -22
  for f in v2-lite v2-lite-cache-apart; do
    timeout 220 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 16384 \
      --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_$f-decode-cache.json" 2>&1 | tail -11
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = half-softmax ]; then
  # is the CUDA Softmax of 16-bit scores the float32 one between Casts (passes/ort_half_softmax.py), and
  # the kernels of a V2-Lite step with it and the query and key RoPE in one op (passes/ort_rope_together.py)
  timeout 120 python bench/gpu_half_softmax.py --commit "$COMMIT" --out "$OUT/gpu_half_softmax.json" 2>&1 | grep -v -i warn | tail -30
  timeout 150 python bench/gpu_step_kernels.py $DIR/v2-lite --batch 1 --rounds 5 --top 30 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite_b1.json" 2>&1 | grep -v -i warn | tail -22
  timeout 270 python bench/gpu_decode.py $DIR/v2-lite-8bit-experts --runtimes ort-graph --contexts 128 4096 16384 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit-experts.json" 2>&1 | tail -11
  rm -f $DIR/v2-lite-8bit-experts/weights.bin
elif [ "$MODE" = rope-softmax ]; then
  # then V2-Lite lowered now beside v2-lite-before (`lower --target ort` from a checkout of the commit before
  # the two stages), one call
  for f in v2-lite v2-lite-before; do
    timeout 270 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 16384 \
      --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_$f.json" 2>&1 | tail -11
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = kernel-routing ]; then
  # do the CUDA MoE and QMoE route as passes/moe_router_inputs.py relies on; the kernels of a V2-Lite step
  # with V2's routing inside com.microsoft::MoE, and of the step lowered before (runs/gpu/v2-lite-before)
  timeout 120 python bench/gpu_moe_routing.py --commit "$COMMIT" --out "$OUT/gpu_moe_routing.json" 2>&1 | grep -v -i warn | tail -8
  for f in v2-lite v2-lite-before; do
    timeout 150 python bench/gpu_step_kernels.py $DIR/$f --batch 1 --rounds 5 --top 40 \
      --commit "$COMMIT" --out "$OUT/gpu_step_kernels_${f}_b1.json" 2>&1 | grep -v -i warn | tail -44
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = static-transposes ]; then
  # the captured step with its size-1 Transposes as Reshapes (the default) and kept as copies, one call; the
  # router GEMM's layouts; the MoE kernels' routing contract (QMoE at a hidden size its CUDA kernel takes)
  timeout 60 python bench/gpu_moe_routing.py --commit "$COMMIT" --out "$OUT/gpu_moe_routing.json" 2>&1 | grep -v -i warn | tail -6
  timeout 60 python bench/gpu_router_gemm.py --commit "$COMMIT" --out "$OUT/gpu_router_gemm.json" 2>&1 | tail -9
  for s in default transposes-kept; do
    timeout 200 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph --contexts 128 4096 16384 \
      --batches 1 8 32 --steps 24 --capture-settings $s --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite_$s.json" \
      2>&1 | tail -10
  done
  timeout 100 python bench/gpu_step_kernels.py $DIR/v2-lite --batch 1 --rounds 5 --top 40 \
    --commit "$COMMIT" --out "$OUT/gpu_step_kernels_v2-lite_b1.json" 2>&1 | grep -v -i warn | tail -16
elif [ "$MODE" = qmoe-blocks ]; then
  # the routing contract with QMoE at 8-bit blocks of 32, 64 and 128 and at V2-Lite's expert shapes, CUDA
  # beside the CPU EP; V2-Lite with 8-bit experts and bf16 linears at every batch
  timeout 120 python bench/gpu_moe_routing.py --commit "$COMMIT" --out "$OUT/gpu_moe_routing.json" 2>&1 | grep -v -i warn | tail -14
  timeout 240 python bench/gpu_decode.py $DIR/v2-lite-8bit-experts --runtimes ort-graph --contexts 128 4096 16384 \
    --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit-experts.json" 2>&1 | tail -10
elif [ "$MODE" = qmoe-packed ]; then
  # QMoE's weights packed for CUDA as the session opens (onnxkit/session.py): a small model's 8-bit-experts
  # logits against its bf16 lowering's (runs/gpu/qmoe-check from `python bench/gpu_qmoe_logits.py make`),
  # the kernels' contract packed and not, and V2-Lite's 8-bit-experts decode
  timeout 200 python bench/gpu_qmoe_logits.py check $DIR/qmoe-check --commit "$COMMIT" \
    --out "$OUT/gpu_qmoe_logits.json" 2>&1 | grep -v -i warn | tail -8
  timeout 90 python bench/gpu_moe_routing.py --commit "$COMMIT" --out "$OUT/gpu_moe_routing.json" 2>&1 \
    | grep -v -i warn | grep QMoE | tail -16
  timeout 240 python bench/gpu_decode.py $DIR/v2-lite-8bit-experts --runtimes ort-graph --contexts 128 4096 \
    --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit-experts.json" 2>&1 | tail -7
elif [ "$MODE" = eight-bit-packed ]; then
  # one folder at a time, its random weights removed after it (the three would not fit the disk together)
  for f in v2-lite-8bit-experts v2-lite-8bit v2-lite; do
    timeout 170 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 --batches 1 8 \
      --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_$f.json" 2>&1 | grep -v -i warn | tail -7
    if [ $f = v2-lite-8bit-experts ]; then  # packing alone, in a fresh process (the weights file now cached)
      timeout 60 python -c "import time, onnx; from pathlib import Path; from dsv3c.onnxkit.session import cuda_qmoe_weights
d = Path('$DIR/$f'); p = onnx.load(d / 'decode.onnx', load_external_data=False); t = time.perf_counter()
w = cuda_qmoe_weights(p, d); print(f'packed {sum(a.size for a in w.values()) / 1e9:.1f}G QMoE weights in {time.perf_counter() - t:.1f} s')"
    fi
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = norms-scale ]; then
  # the score GEMMs scaled on their own and the one-row RMSNorms with a zero skip, against the lowering before
  # (runs/gpu/v2-lite-before, from a checkout of the commit before) run with its norms as they are; then the
  # kernels of a step of each
  for f in v2-lite v2-lite-before; do
    S=default; [ $f = v2-lite-before ] && S=plain-norms
    timeout 200 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 16384 --batches 1 8 \
      --steps 24 --capture-settings $S --commit "$COMMIT" --out "$OUT/gpu_decode_$f.json" 2>&1 | grep -v -i warn | tail -8
    timeout 90 python bench/gpu_step_kernels.py $DIR/$f --batch 1 --rounds 3 --top 40 --capture-settings $S \
      --commit "$COMMIT" --out "$OUT/gpu_step_kernels_${f}_b1.json" 2>&1 | grep -v -i warn | tail -12
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = experts-now ]; then
  for f in v2-lite-8bit-experts v2-lite; do
    B="1 8"; [ $f = v2-lite ] && B="1 8 32"
    timeout 260 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 16384 --batches $B \
      --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_$f.json" 2>&1 | grep -v -i warn | tail -10
    rm -f $DIR/$f/weights.bin
  done
elif [ "$MODE" = qmoe-routing ]; then
  # a CUDA session moves QMoE's plain softmax routing into the kernel (onnxkit/kernel_routing.py): a small
  # model's logits (runs/gpu/qmoe-check from `python bench/gpu_qmoe_logits.py make`), then V2-Lite's
  # 8-bit experts with it and with the graph's routing (DSV3C_GRAPH_ROUTED_QMOE=1), and a step's kernels
  timeout 150 python bench/gpu_qmoe_logits.py check $DIR/qmoe-check --commit "$COMMIT" \
    --out "$OUT/gpu_qmoe_logits.json" 2>&1 | grep -v -i warn | tail -8
  f=v2-lite-8bit-experts
  for r in 0 1; do
    n=$f; [ $r = 1 ] && n=$f-graph-routed
    DSV3C_GRAPH_ROUTED_QMOE=$r timeout 170 python bench/gpu_decode.py $DIR/$f --runtimes ort-graph --contexts 128 4096 \
      --batches 1 8 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_$n.json" 2>&1 | grep -v -i warn | tail -6
  done
  timeout 110 python bench/gpu_step_kernels.py $DIR/$f --batch 1 --rounds 3 --top 30 --commit "$COMMIT" \
    --out "$OUT/gpu_step_kernels_${f}_b1.json" 2>&1 | grep -v -i warn | tail -9
  rm -f $DIR/$f/weights.bin
elif [ "$MODE" = small-ablations ]; then
  timeout 120 python bench/ort_step_nodes.py --device cuda --out "$OUT/ort_step_nodes_small.json" 2>&1 | tail -5
  timeout 150 python bench/attention_past_apart.py --device cuda --capacities 128 4096 16384 \
    --out "$OUT/attention_past_apart_small.json" 2>&1 | tail -5
else
  timeout 330 python bench/gpu_decode.py $DIR/v2-lite --runtimes ort-graph torch transformers \
    --contexts 128 4096 --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite.json" 2>&1 | tail -24
  timeout 150 python bench/gpu_decode.py $DIR/v2-lite-8bit --runtimes ort-graph \
    --contexts 128 4096 --batches 1 8 32 --steps 24 --commit "$COMMIT" --out "$OUT/gpu_decode_v2-lite-8bit.json" 2>&1 | tail -12
  timeout 100 python bench/gpu_step_kernels.py $DIR/v2-lite $DIR/v2-lite-8bit --batch 1 --commit "$COMMIT" --top 25 \
    --out "$OUT/gpu_step_kernels_v2-lite_b1.json" 2>&1 | tail -54
fi
