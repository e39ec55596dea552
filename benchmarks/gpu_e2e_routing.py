"""H2 end to end on a GPU: decode tokens/s of full, block-route, cluster-route and cluster-route with
relayout at equal budget, all from one prefilled snapshot (what ``kvlab validate`` measures on the CPU
with the real model, whose weights cannot travel to the GPU machine: here a random-weight model of a
public shape, which decodes exactly as fast).

    python benchmarks/gpu_e2e_routing.py [--model random:llama-3.2-1b] [--context 32768] [--batch 4]
                                         [--steps 16] [--budget 0.125] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvlab
from kvlab.experiments.access import E2E_METHODS
from kvlab.experiments.runner import resolve, run_method
from kvlab.generation import prefill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model, _ = kvlab.load(args.model, dtype=dtype)
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, model.config.vocab_size - 10, (args.context,), generator=g).tolist()
           for _ in range(args.batch)]
    t0 = time.perf_counter()
    snap = prefill(model, ids, block_size=16, reserve_tokens=args.steps + 8, observe=64)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: {args.model} {dtype}, {args.context} tokens × {args.batch}, prefill {prefill_s:.1f} s", flush=True)
    notes: list[str] = []
    rows = []
    for spec in resolve(E2E_METHODS, notes, args.budget):
        run_method(model, snap, spec.make(args.budget), None, 3)  # warm-up: kernels compiled, buffers grown
        res = run_method(model, snap, spec.make(args.budget), None, args.steps + 1)
        row = {"method": spec.label, "tokens_per_second": res.steps * args.batch / res.seconds,
               "ms_per_step": 1e3 * res.seconds / res.steps, "compress_seconds": res.compress_seconds}
        rows.append(row)
        print(f"  {spec.label:<24} {row['tokens_per_second']:8.1f} tok/s  {row['ms_per_step']:8.1f} ms/step  "
              f"prefill-end work {row['compress_seconds']:.2f} s", flush=True)
    result = {"device": name, "model": args.model, "dtype": dtype, "context": args.context, "batch": args.batch,
              "steps": args.steps, "budget": args.budget, "prefill_seconds": prefill_s, "rows": rows,
              "notes": notes, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
