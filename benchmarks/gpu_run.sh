#!/usr/bin/env bash
# Everything kvlab measures on a CUDA GPU, in one command (the device machine of this workplace has
# python3 with CUDA torch and Triton, but a newer transformers: the pinned one travels as a wheel in .whl/,
# made here by `bash benchmarks/gpu_wheels.sh`).
#   bash benchmarks/gpu_run.sh [smoke|bench|full|e2e|rows]   -> logs and JSON under $OUT (default ./out/gpu)
# smoke: quick sizes; bench: the benchmarks and model checks; full: also the kernel tests on the GPU;
# e2e (issue 13, at most 7.5 minutes): the fused kernel's tests on the GPU, CUDA graphs vs eager and Triton vs
# torch on a tiny model, then the decode-attention table at 128K x 1 and x 4 (the fused scoring + top-k among it)
# and decode end to end of random-weight llama-3.1-8b in bf16 through kvlab's decode with CUDA graphs (full and
# block-route 1/8 at 32K x 1, 128K x 1 and 128K x 4 -- x 2 where 4 does not fit), beside the roofline and
# transformers' StaticCache + SDPA under a CUDA graph.
# rows (issue 14, 3-5 minutes): H2 at smaller rows, benchmarks/gpu_access_rows.sh (head_dim 16..256, bf16).
# Each step has its own time limit, so a slow or broken step still leaves the others' results.
set -uo pipefail
mode=${1:-full}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 KVLAB_QUIET=1 KVLAB_CACHE=/tmp/kvlab-cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

checks() {
  echo "== model-path checks on the GPU"
  timeout "$1" python3 benchmarks/gpu_checks.py > "$OUT/gpu-checks.txt" 2>&1; grep -v "^ok  " "$OUT/gpu-checks.txt" | tail -20
}
kernel_tests() {
  echo "== kernel tests on the GPU"
  timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py "${@:2}" > "$OUT/kernel-tests.txt" 2>&1
  tail -5 "$OUT/kernel-tests.txt"
}
case "$mode" in
rows)
  timeout 420 bash benchmarks/gpu_access_rows.sh ;;
e2e)
  kernel_tests 60 -k "block_select or attend_triton or block_route_decodes"
  echo "== CUDA graphs vs eager, Triton vs torch (tiny-llama)"
  timeout 90 python3 benchmarks/gpu_checks.py --graphs > "$OUT/gpu-checks-graphs.txt" 2>&1
  grep -v "^ok  " "$OUT/gpu-checks-graphs.txt" | tail -20
  echo "== kvlab bench gpu: 128K x 1 and x 4, and end to end with CUDA graphs"
  timeout 300 python3 -m kvlab bench gpu --context 128k --batch 1,4 --no-tune --iters 30 --warmup 5 --out-dir "$OUT" \
    --no-docs > "$OUT/bench-e2e.txt" 2> "$OUT/bench-e2e.log"
  grep -E "copy|e2e|fused|wrote|rror" "$OUT/bench-e2e.log" | tail -30
  tail -40 "$OUT/bench-e2e.txt" ;;
smoke)
  checks 150
  timeout 120 python3 -m kvlab bench access --device cuda --context 4096 --context 65536 --reps 3 2>&1 | tail -20
  timeout 200 python3 -m kvlab bench gpu --quick --no-tune --iters 10 --warmup 3 --batch 4 --out-dir "$OUT" --no-docs \
    > "$OUT/quick.txt" 2> "$OUT/quick.log"; tail -25 "$OUT/quick.log"
  kernel_tests 120 -k dispatch ;;
full|bench)
  echo "== kvlab bench gpu"
  timeout 360 python3 -m kvlab bench gpu --out-dir "$OUT" --no-docs > "$OUT/bench-gpu.txt" 2> "$OUT/bench-gpu.log"
  grep -E "tuned|copy|e2e|wrote|Error|error" "$OUT/bench-gpu.log" | tail -25
  echo "== kvlab bench access --device cuda"
  timeout 90 python3 -m kvlab bench access --device cuda --context 4096 --context 8192 --context 16384 --context 32768 \
    --context 65536 --json > "$OUT/access-cuda.json" 2> "$OUT/access-cuda.log"; tail -3 "$OUT/access-cuda.log"
  echo "== H2 end to end: full vs block-route vs cluster-route (random llama-3.2-1b, 32K × 4, bf16)"
  timeout 150 python3 benchmarks/gpu_e2e_routing.py --out "$OUT/e2e-routing.json" 2>&1 | tail -6
  checks 100
  [ "$mode" = full ] && kernel_tests 120 ;;
esac
