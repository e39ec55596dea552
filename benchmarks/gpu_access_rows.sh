#!/usr/bin/env bash
# H2 at smaller rows on a CUDA GPU: does a scattered token read start to cost more than a contiguous block
# once one K (or V) row is small? `kvlab bench access --device cuda` at head_dim 16, 32, 64, 128 and 256
# (32 query heads, 8 KV heads, bf16: rows of 32 to 512 bytes), plus the two built-in Qwen shapes
# (0.5B: 14 q / 2 KV heads, head_dim 64; 1.5B: 12 q / 2 KV heads, head_dim 128); then one table of
# scattered / best-contiguous time per row size and context, and the largest row size at which
# contiguity pays (> 1.2× at some context).
# fp8 is not measured: kvlab's Triton paged kernel reads bf16/fp16/fp32 K/V only (no float8 path).
#   bash benchmarks/gpu_access_rows.sh            -> JSON per shape and access-rows.txt under $OUT (default out/gpu)
#   DEVICE=cpu CONTEXTS="--context 4096" bash benchmarks/gpu_access_rows.sh   (a smoke run of the script itself)
# About 3-5 minutes on an H100/H200 (7 shapes × 3 contexts); each shape has its own 90-s limit.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 KVLAB_QUIET=1
device=${DEVICE:-cuda}
contexts=${CONTEXTS:-"--context 4096 --context 32768 --context 131072"}
run() {  # name, then bench access options
  local name=$1; shift
  echo "== access rows: $name ($*)"
  timeout 90 python3 -m kvlab bench access --device "$device" $contexts --reps 5 "$@" --json \
    > "$OUT/access-rows-$name.json" 2> "$OUT/access-rows-$name.log" || tail -3 "$OUT/access-rows-$name.log"
}
for d in 16 32 64 128 256; do run "d$d" --head-dim "$d"; done
run qwen05b --head-dim 64 --kv-heads 2 --q-heads 14
run qwen15b --head-dim 128 --kv-heads 2 --q-heads 12
python3 - "$OUT" <<'EOF' | tee "$OUT/access-rows.txt"
import json, sys
from pathlib import Path

from kvlab.experiments.access import summarize_bench

out = Path(sys.argv[1])
paying = []
print(f"{'shape':>8} {'row bytes':>9} {'kv×q heads':>10}  scattered / best contiguous (blocks >= 16) per context")
results = []
for path in sorted(out.glob("access-rows-*.json")):
    try:
        results.append((path, json.loads(path.read_text())))
    except (json.JSONDecodeError, OSError):
        print(f"{path.stem}: no result (see {path.with_suffix('.log').name})")
for path, res in sorted(results, key=lambda x: (x[1]["head_dim"], x[1]["kv_heads"])):
    s = summarize_bench(res)
    row = res["head_dim"] * (2 if "16" in res.get("dtype", "bfloat16") else 4)  # bytes of one K or V row
    gaps = ", ".join(f"{g['context'] // 1024}K {g['gap']:.2f}×" for g in s["gaps"])
    print(f"{path.stem.removeprefix('access-rows-'):>8} {row:>9} {res['kv_heads']:>4}×{res['q_heads']:<5}  {gaps}")
    if any(g["gap"] > 1.2 for g in s["gaps"]):
        paying.append(row)
print("contiguity pays (> 1.2× at some context) at row sizes: "
      + (", ".join(f"{b} B" for b in sorted(set(paying))) if paying else "none measured"))
EOF
