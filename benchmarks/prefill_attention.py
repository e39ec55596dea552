"""Prefill attention on the CPU: one 1024-query chunk at the end of T keys, the masked SDPA call
(:func:`kvlab.attention.gqa.attend_rows` with the causal mask) against the maskless causal-chunk path
(:func:`kvlab.attention.gqa.attend_causal_chunk`), alternating in one process so that both see the same
machine load. Shape: qwen2.5-coder-1.5b's layer (12 query heads, 2 KV heads, head_dim 128), fp32, batch 1.

    python benchmarks/prefill_attention.py [--context 4096 --context 32768] [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvlab.attention import gqa


def measure(context: int, chunk: int, reps: int, kv_heads: int = 2, groups: int = 6, head_dim: int = 128) -> dict:
    torch.manual_seed(0)
    query = torch.randn(1, kv_heads * groups, chunk, head_dim)
    k, v = torch.randn(1, kv_heads, context, head_dim), torch.randn(1, kv_heads, context, head_dim)
    kpos = torch.arange(context).expand(1, kv_heads, context)
    qpos = torch.arange(context - chunk, context).expand(1, chunk)
    q = gqa.group_queries(query, kv_heads)
    masked, fast = [], []
    for _ in range(reps + 1):  # the first round warms up
        t = time.perf_counter()
        mask = gqa.expand_groups(gqa.visibility(kpos, qpos[:, None, :], None), groups)
        ref = gqa.attend_rows(q, k, v, mask, head_dim ** -0.5)
        masked.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = gqa.attend_causal_chunk(q, k, v, groups, head_dim ** -0.5)
        fast.append(time.perf_counter() - t)
    return {"context": context, "chunk": chunk, "masked_s": min(masked[1:]), "causal_chunk_s": min(fast[1:]),
            "speedup": min(masked[1:]) / min(fast[1:]), "max_abs_diff": (out - ref).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, action="append")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(c, args.chunk, args.reps) for c in args.context or [4096, 8192, 16384, 32768]]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    print(f"prefill attention, one {args.chunk}-query chunk, 12 q / 2 KV heads, head_dim 128, fp32, "
          f"{torch.get_num_threads()} threads; best of {args.reps}")
    print(f"{'keys':>6} {'masked':>9} {'causal-chunk':>13} {'speedup':>8} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['context']:>6} {r['masked_s'] * 1e3:>7.0f}ms {r['causal_chunk_s'] * 1e3:>11.0f}ms "
              f"{r['speedup']:>7.2f}x {r['max_abs_diff']:>11.1e}")


if __name__ == "__main__":
    main()
