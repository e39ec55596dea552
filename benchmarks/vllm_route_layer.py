"""What one routed layer of vLLM block-route costs per decode step, for each page selection and page size:
vLLM's own CPU paged-attention kernel over the whole cache (vanilla) against kvlab's page selection
(:func:`kvlab.vllm.routing.select_pages`) plus the same kernel over the chosen pages, all in one process on
the same shapes, so the configurations compare without the noise of separate engine runs and without a
prefill (``kvlab bench vllm`` measures whole engines; a 16K x 4 prefill takes 15 minutes a run on one core).

Keys and values are random: neither the kernel's nor the selection's time depends on them. Shapes default to
qwen2.5-coder-0.5b's (14 query heads, 2 KV heads, head_dim 64, bf16). Run under .venv-vllm:

    python benchmarks/vllm_route_layer.py [--context 16384] [--batch 4] [--budget 0.125] [--pages 128,64,32]
                                          [--repeats 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds per call (one warm-up call first)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def kernel_call(query: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor,
                isa: str, scale: float) -> Callable[[], None]:
    """vLLM's ``cpu_attention_with_kv_cache`` as its CPU backend calls it, one decode token per request;
    ``cache`` ``[blocks, H_kv, page, 2 * D]`` (a head slice is read as it is)."""
    from vllm import _custom_ops as ops

    reqs, heads, dim = query.shape
    nb, kv_heads, page, _ = cache.shape
    key_cache, value_cache = cache.view(nb, kv_heads, 2 * page, dim).chunk(2, dim=2)
    starts = torch.arange(reqs + 1, dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=reqs, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, seq_lens=seq_lens, dtype=query.dtype,
        query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False,
        dynamic_causal=None, kv_cache_dtype="auto")
    out = torch.empty(reqs, heads * dim, dtype=query.dtype)

    def run() -> None:
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=starts,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=table, softcap=0.0, scheduler_metadata=sched, s_aux=None, dynamic_causal=None,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    return run


def measure(context: int, batch: int, budget: float, page: int, per_head: bool, args: argparse.Namespace
            ) -> dict[str, float | int | str]:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvlab.vllm import config
    from kvlab.vllm.routing import compact_block_table

    dtype, hq, hk, dim = torch.bfloat16, args.query_heads, args.kv_heads, args.head_dim
    isa, scale = _get_attn_isa(dtype, page, dim), dim ** -0.5
    pages = context // page
    blocks = batch * pages + 1
    cache = torch.randn(blocks, hk, page, 2 * dim, dtype=dtype)
    query = torch.randn(batch, hq, dim, dtype=dtype)
    table = torch.randperm(blocks - 1, dtype=torch.int32)[: batch * pages].view(batch, pages)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    full = timed(kernel_call(query, cache, table, seq_lens, isa, scale), args.repeats)

    # the adapter kvlab serve makes from `--method block-route --budget B [-p per_head=true] --block-size P`
    adapter = config.parse({"method": "block-route", "budget": budget, "per_head": per_head}, page).adapter
    groups = adapter.head_groups(hk)
    plan = adapter.step_plan(table, seq_lens, batch, hk)
    summaries = adapter.summaries(blocks, hk, dim, torch.device("cpu"), dtype)
    for t in (summaries.kmin, summaries.kmax) if summaries.bounds else (summaries.ksum,):
        t.normal_()
    select = timed(lambda: adapter.select(query, plan, summaries), args.repeats)
    physical, _ = adapter.select(query, plan, summaries)
    read = 0.0
    g_q, g_k = hq // groups, hk // groups
    for g in range(groups):  # as the backend does: one call per group, on its slice of the heads and the cache
        q = query[:, g * g_q:(g + 1) * g_q].contiguous()
        read += timed(kernel_call(q, cache[:, g * g_k:(g + 1) * g_k], compact_block_table(table, physical[:, g]),
                                  plan.seq_lens, isa, scale), args.repeats)
    routed = select + read
    return {"context": context, "batch": batch, "page": page, "selection": "per KV head" if per_head else "per request",
            "pages read": int(plan.k[0]), "vanilla ms": full, "select ms": select, "read ms": read,
            "routed ms": routed, "layer speedup": full / routed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--pages", default="128,64,32", help="page sizes (multiples of 32: vLLM's CPU kernel)")
    ap.add_argument("--query-heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pages = [int(p) for p in args.pages.split(",")]
    for p in pages:
        if p < 32 or p % 32 or args.context % p:
            raise SystemExit(f"--pages: each page size must be a multiple of 32 that divides --context "
                             f"({args.context}); got {p}")
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget is the fraction of pages read, in (0, 1]; got {args.budget}")
    from kvlab.machine import describe

    rows = [measure(args.context, args.batch, args.budget, p, per_head, args)
            for p in pages for per_head in (False, True)]
    if args.json:
        print(json.dumps({"machine": describe(), "torch_threads": torch.get_num_threads(), "rows": rows}, indent=1))
        return
    print(f"one routed layer per decode step, {args.context} x {args.batch}, budget {args.budget}, {describe()}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
