"""GPU benchmark of decode attention: kvlab's Triton kernels against library kernels, and end to end.

What it measures (issue 7), in one run on one device:

1. The device: copy bandwidth (``dst.copy_(src)`` of 1 GiB, read + write bytes counted) and bf16
   matmul rate (8192³). Every bandwidth below is compared with the copy bandwidth.
2. Decode attention, one new token, 8 KV × 32 query heads, head_dim 128, bf16, contexts 8K–128K,
   batch 1–16: torch SDPA (the GQA group's queries as rows over its KV head), flash-attn and
   FlashInfer when installed, kvlab's paged kernel over all blocks, ``block-route`` at budgets 1/4,
   1/8, 1/16 (attention over the selected blocks; scoring + top-k + attention, unfused -- the scoring
   kernel, then ``torch.topk`` -- and with block-route's fused scoring + top-k kernel; the fused
   selection alone), and block size 1 / 16 / 64 at the same 1/8 budget. Time is the median of
   CUDA-event timings after a warm-up, with inputs rotated over enough copies that they do not fit in
   L2. Each row also reports the bytes the variant must read (K and V of the tokens it reads, plus
   block tables, summaries, query, output) and the bandwidth achieved on them.
3. End to end (:func:`e2e_rows`): decode tokens/s of a random-weight ``llama-3.1-8b`` in bf16 through
   :func:`kvlab.generation.decode` with CUDA graphs, ``full`` and ``block-route`` at 1/8, at 32K × 1,
   128K × 1 and 128K × 4 (× 2 where 4 does not fit), beside the roofline (bytes of weights + KV read
   per step ÷ the measured copy bandwidth) and transformers' own ``StaticCache`` + SDPA decode step
   replayed from a CUDA graph.

Results go to ``benchmarks/results/<device>.json``. Selections are random (the kernels' cost does not
depend on which blocks are chosen, only on how many and how scattered), so no quality is measured.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvlab.errors import KVLabError, check

DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 4, 16)
QUICK_CONTEXTS = (8192, 32768)
QUICK_BATCHES = (1, 4)
BUDGETS = (1 / 4, 1 / 8, 1 / 16)
BLOCK_SIZES = (1, 16, 64)
E2E_CONFIGS = ((32768, 1), (131072, 1), (131072, 4))  # (context, batch); batch halves until it fits
E2E_BUDGET = 1 / 8
KV_HEADS, Q_HEADS, HEAD_DIM = 8, 32, 128
RESULTS_DIR = Path("benchmarks/results")
Log = Callable[[str], None]


# ------------------------------------------------------------------ timing
def require_cuda() -> torch.device:
    """The CUDA device, or one clear error."""
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise KVLabError(f"the GPU benchmark needs a CUDA GPU, and torch {torch.__version__} here {why}; run "
                         "`kvlab bench gpu` on a machine with an NVIDIA GPU, a CUDA build of torch and kvlab[triton]")
    try:
        importlib.import_module("triton")
    except ImportError:
        raise KVLabError("the GPU benchmark needs triton: pip install 'kvlab[triton]'") from None
    return torch.device("cuda", torch.cuda.current_device())


def cuda_time_us(fn: Callable[[int], Any], rotate: int = 1, warmup: int = 10, iters: int = 50) -> float:
    """Median time of ``fn(i % rotate)`` in µs, from CUDA events, after ``warmup`` calls."""
    for i in range(warmup):
        fn(i % rotate)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i % rotate)
        ends[i].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def graph_time_us(fn: Callable[[int], Any], rotate: int = 1, warmup: int = 3, iters: int = 20,
                  calls: int = 16) -> float:
    """Time per call of ``fn`` with the host's launch overhead taken out: ``calls`` calls (rotating over
    the ``rotate`` input copies) captured in one CUDA graph, the median replay divided by ``calls``.

    Raises whatever the capture raises (a function that syncs or allocates on the host cannot be
    captured); callers report that instead of a time.
    """
    calls = max(calls, rotate) // rotate * rotate
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for i in range(2 * rotate):
            fn(i % rotate)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % rotate)
    return cuda_time_us(lambda _: graph.replay(), 1, warmup, iters) / calls


def device_rates(device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s)."""
    free, _ = torch.cuda.mem_get_info(device)
    n = min(1 << 30, free // 8)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t_copy = cuda_time_us(lambda _: dst.copy_(src), warmup=warmup, iters=iters)
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    t_mm = cuda_time_us(lambda _: a @ b, warmup=warmup, iters=max(10, iters // 5))
    return {"copy_bytes": 2 * n, "copy_us": t_copy, "copy_GBps": 2 * n / t_copy / 1e3,
            "matmul_n": m, "matmul_us": t_mm, "matmul_TFLOPs": 2 * m**3 / t_mm / 1e6}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "flash_attn", "flashinfer"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception:  # noqa: BLE001 -- a broken optional install counts as absent
            out[name] = None
    return out


# ------------------------------------------------------------------ attention kernels
def _rotation(bytes_per_copy: int, device: torch.device) -> int:
    """Input copies to rotate over so that together they are at least 4× the L2 cache (at most 8)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or 50 << 20
    return max(1, min(8, math.ceil(4 * l2 / max(bytes_per_copy, 1))))


def _random_lists(rows: int, tokens: int, block_size: int, budget: float, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``budget`` of each row's blocks chosen at random: physical ids ``[rows, k]`` (ascending), lens, k."""
    n = tokens // block_size
    k = max(1, round(n * budget))
    chosen = torch.rand(rows, n, device=device).argsort(-1)[:, :k].sort(-1).values
    table = (chosen + torch.arange(rows, device=device)[:, None] * n).int()
    return table, torch.full((rows,), k * block_size, dtype=torch.int32, device=device), k


def attention_rows(context: int, batch: int, device: torch.device, warmup: int, iters: int,
                   log: Log) -> list[dict[str, Any]]:
    """Time every variant at one (context, batch); see the module docstring."""
    from kvlab.kernels import dispatch
    from kvlab.kernels.block_scoring import block_scores, block_select, fits
    from kvlab.kernels.paged_attention import paged_decode_attention

    h, hq, d, dt = KV_HEADS, Q_HEADS, HEAD_DIM, torch.bfloat16
    g, rows, scale, elt = hq // h, batch * KV_HEADS, HEAD_DIM**-0.5, 2
    slots = rows * context
    kv_bytes = 2 * slots * d * elt
    q_bytes = 2 * batch * hq * d * elt  # query read + output written
    copies = _rotation(kv_bytes, device)
    free, _ = torch.cuda.mem_get_info(device)
    if copies * kv_bytes * 1.3 > free:
        copies = 1
    if kv_bytes * 1.3 > free:
        return [{"context": context, "batch": batch, "variant": "all", "error":
                 f"needs {kv_bytes / 1e9:.1f} GB of K/V, {free / 1e9:.1f} GB free"}]
    keys = [torch.randn(slots, d, device=device, dtype=dt) for _ in range(copies)]
    values = [torch.randn(slots, d, device=device, dtype=dt) for _ in range(copies)]
    queries = [torch.randn(batch, h, g, d, device=device, dtype=dt) for _ in range(copies)]
    out = torch.empty(batch, h, g, d, device=device, dtype=dt)
    results: list[dict[str, Any]] = []

    def add(variant: str, fn: Callable[[int], Any] | None, bytes_read: int, budget: float = 1.0,
            block_size: int | None = None, part: str = "attention", error: Exception | None = None) -> None:
        try:
            if error is not None:
                raise error
            us = cuda_time_us(fn, copies, warmup, iters)
            row = {"context": context, "batch": batch, "variant": variant, "part": part, "budget": budget,
                   "block_size": block_size, "us": us, "bytes": bytes_read, "GBps": bytes_read / us / 1e3}
            try:  # the same calls replayed from a CUDA graph: the kernels' own time, launch overhead removed
                row["us_graph"] = graph_time_us(fn, copies, max(2, warmup // 3), max(10, iters // 3))
                row["GBps_graph"] = bytes_read / row["us_graph"] / 1e3
            except Exception as exc:  # noqa: BLE001 -- not capturable: the eager time stands alone
                row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            results.append(row)
        except Exception as exc:  # noqa: BLE001 -- one broken variant must not lose the others
            results.append({"context": context, "batch": batch, "variant": variant, "part": part,
                            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        label = variant if part == "attention" else f"{variant} · {part}"
        last = results[-1]
        log(f"  {context // 1024}K × {batch}  {label:<72} " + (
            f"{last['us']:9.1f} µs eager, {last['us_graph']:8.1f} µs graph" if "us_graph" in last else
            f"{last['us']:9.1f} µs eager, graph: {last.get('graph_error')}" if "us" in last else last["error"]))

    full_bytes = kv_bytes + q_bytes
    # torch SDPA: the group's G query heads are G query rows over their KV head (no K/V repeat).
    add("torch sdpa", lambda c: F.scaled_dot_product_attention(
        queries[c], keys[c].view(batch, h, context, d), values[c].view(batch, h, context, d), scale=scale),
        full_bytes)
    _library_variants(add, keys, values, queries, batch, context, scale, full_bytes, device)

    nb = context // 16
    table = (torch.arange(rows, device=device)[:, None] * nb + torch.arange(nb, device=device)[None, :]).int()
    lens = torch.full((rows,), context, dtype=torch.int32, device=device)
    add("kvlab full (bs=16)", lambda c: paged_decode_attention(
        queries[c], keys[c], values[c], table, lens, 16, scale, max_tokens=context, out=out),
        full_bytes + table.numel() * 4, block_size=16)

    counts = torch.full((rows,), nb, dtype=torch.int32, device=device)
    centroids = [torch.randn(rows * nb, d, device=device, dtype=dt) for _ in range(copies)]
    for budget in BUDGETS:
        lists = [_random_lists(rows, context, 16, budget, device) for _ in range(copies)]
        k = lists[0][2]
        sel_bytes = 2 * rows * k * 16 * d * elt + rows * k * 4 + q_bytes
        name = f"kvlab block-route 1/{round(1 / budget)} (bs=16)"
        add(name, lambda c, ls=lists, k=k: paged_decode_attention(
            queries[c], keys[c], values[c], ls[c][0], ls[c][1], 16, scale, max_tokens=k * 16, out=out),
            sel_bytes, budget, 16)

        def routed(c: int, k: int = k, kmin: torch.Tensor | None = None, lens_k: torch.Tensor = lists[0][1]) -> None:
            if kmin is None:
                scores = block_scores(queries[c], table, counts, centroids=centroids[c])
            else:
                scores = block_scores(queries[c], table, counts, kmin=kmin, kmax=centroids[c])
            chosen, _ = dispatch.top_k_blocks(scores, table, k)
            paged_decode_attention(queries[c], keys[c], values[c], chosen, lens_k, 16, scale, max_tokens=k * 16,
                                   out=out)

        summary_bytes = rows * nb * (d * elt + 4)
        add(name, routed, sel_bytes + summary_bytes, budget, 16, part="centroid scores + top-k + attention")
        if fits(nb):  # block-route's own step: one fused launch selects, the paged kernel reads
            row_lens = torch.full((rows,), context, dtype=torch.long, device=device)
            row_k = torch.full((rows,), k, dtype=torch.long, device=device)
            offsets = torch.arange(rows, device=device) * context

            def select(c: int, k: int = k, row_lens: torch.Tensor = row_lens, row_k: torch.Tensor = row_k
                       ) -> tuple[torch.Tensor, torch.Tensor]:
                return block_select(queries[c], row_lens, row_k, k, 16, centroids=centroids[c].view(rows, nb, d),
                                    sink_blocks=1, local_blocks=2)

            def fused(c: int, k: int = k, select: Callable = select, offsets: torch.Tensor = offsets) -> None:
                chosen, tokens = select(c)
                paged_decode_attention(queries[c], keys[c], values[c], chosen, tokens, 16, scale, row_offsets=offsets,
                                       max_tokens=k * 16, out=out)

            add(name, fused, sel_bytes + summary_bytes, budget, 16, part="fused scores + top-k + attention")
            add(name, select, summary_bytes + rows * k * 4, budget, 16, part="fused scores + top-k")
        if budget == 1 / 8:
            kmin = torch.randn(rows * nb, d, device=device, dtype=dt)
            quest_bytes = sel_bytes + summary_bytes + rows * nb * d * elt
            add(name, lambda c, k=k, kmin=kmin: routed(c, k, kmin), quest_bytes, budget, 16,
                part="Quest bound + top-k + attention")

    budget = 1 / 8
    for bs in BLOCK_SIZES:
        lists = [_random_lists(rows, context, bs, budget, device) for _ in range(copies)]
        k = lists[0][2]
        sel_bytes = 2 * rows * k * bs * d * elt + rows * k * 4 + q_bytes
        add(f"kvlab gather bs={bs} at 1/8", lambda c, ls=lists, k=k, bs=bs: paged_decode_attention(
            queries[c], keys[c], values[c], ls[c][0], ls[c][1], bs, scale, max_tokens=k * bs, out=out),
            sel_bytes, budget, bs)
    return results  # the inputs are freed with this frame; the caller empties the allocator cache


def _library_variants(add: Callable[..., None], keys: list[torch.Tensor], values: list[torch.Tensor],
                      queries: list[torch.Tensor], batch: int, context: int, scale: float, full_bytes: int,
                      device: torch.device) -> None:
    """flash-attn and FlashInfer decode, when installed, each on a copy of K/V in its own layout."""
    h, hq, d = KV_HEADS, Q_HEADS, HEAD_DIM
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # noqa: BLE001
        flash_attn_with_kvcache = None
    if flash_attn_with_kvcache is not None:
        try:  # [B, T, H, D]
            kb = [k.view(batch, h, context, d).transpose(1, 2).contiguous() for k in keys]
            vb = [v.view(batch, h, context, d).transpose(1, 2).contiguous() for v in values]
            add("flash-attn", lambda c: flash_attn_with_kvcache(
                queries[c].reshape(batch, 1, hq, d), kb[c], vb[c], softmax_scale=scale), full_bytes)
            del kb, vb
        except Exception as exc:  # noqa: BLE001
            add("flash-attn", None, full_bytes, error=exc)
    try:
        import flashinfer
    except Exception:  # noqa: BLE001
        flashinfer = None
    if flashinfer is not None:
        try:  # paged, HND: [pages, H, page, D]
            page = 16
            pages = context // page
            kp = [k.view(batch, h, pages, page, d).transpose(1, 2).reshape(batch * pages, h, page, d).contiguous()
                  for k in keys]
            vp = [v.view(batch, h, pages, page, d).transpose(1, 2).reshape(batch * pages, h, page, d).contiguous()
                  for v in values]
            workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
            indptr = (torch.arange(batch + 1, device=device) * pages).int()
            indices = torch.arange(batch * pages, device=device).int()
            last = torch.full((batch,), page, dtype=torch.int32, device=device)
            try:
                wrapper.plan(indptr, indices, last, hq, h, d, page, pos_encoding_mode="NONE",
                             q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=scale)
            except TypeError:  # older signatures
                wrapper.plan(indptr, indices, last, hq, h, d, page, pos_encoding_mode="NONE",
                             data_type=torch.bfloat16)
            add("flashinfer (page 16)", lambda c: wrapper.run(queries[c].reshape(batch, hq, d), (kp[c], vp[c])),
                full_bytes)
        except Exception as exc:  # noqa: BLE001
            add("flashinfer (page 16)", None, full_bytes, error=exc)


# ------------------------------------------------------------------ tuning
TUNE_CANDIDATES = [(block_n, warps, stages) for block_n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)]


def tune_paged_kernel(device: torch.device, warmup: int, iters: int, log: Log, context: int = 32768,
                      batch: int = 4) -> dict[str, Any]:
    """Time the paged kernel (full read, bs 16; CUDA-graph replay) in a few launch configurations; keep the fastest.

    Sets :data:`kvlab.kernels.paged_attention.TUNING` for the rest of the run (every kvlab variant).
    """
    from kvlab.kernels import paged_attention as pa

    h, g, d, dt = KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM, torch.bfloat16
    rows = batch * h
    slots = rows * context
    copies = _rotation(2 * slots * d * 2, device)
    keys = [torch.randn(slots, d, device=device, dtype=dt) for _ in range(copies)]
    values = [torch.randn(slots, d, device=device, dtype=dt) for _ in range(copies)]
    queries = [torch.randn(batch, h, g, d, device=device, dtype=dt) for _ in range(copies)]
    out = torch.empty(batch, h, g, d, device=device, dtype=dt)
    nb = context // 16
    table = (torch.arange(rows, device=device)[:, None] * nb + torch.arange(nb, device=device)[None, :]).int()
    lens = torch.full((rows,), context, dtype=torch.int32, device=device)
    default = dict(pa.TUNING)
    tried = []
    for block_n, warps, stages in TUNE_CANDIDATES:
        pa.TUNING.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        entry: dict[str, Any] = dict(pa.TUNING)
        try:  # CUDA-graph replay: eager launches are host-bound at these sizes and would hide the kernel
            entry["us"] = graph_time_us(lambda c: pa.paged_decode_attention(
                queries[c], keys[c], values[c], table, lens, 16, d**-0.5, max_tokens=context, out=out),
                copies, max(2, warmup // 3), max(10, iters // 3))
        except Exception as exc:  # noqa: BLE001 -- e.g. out of shared memory: skip the configuration
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        tried.append(entry)
    timed = [e for e in tried if "us" in e]
    best = min(timed, key=lambda e: e["us"]) if timed else {**default, "us": None}
    pa.TUNING.update({k: best[k] for k in ("BLOCK_N", "num_warps", "num_stages")})
    log(f"paged kernel tuned at {context // 1024}K × {batch}: {pa.TUNING} "
        + (f"({best['us']:.1f} µs)" if best["us"] else "(no configuration ran; defaults kept)"))
    return {"context": context, "batch": batch, "chosen": dict(pa.TUNING), "default": default, "tried": tried}


# ------------------------------------------------------------------ targets
def evaluate_targets(rows: list[dict[str, Any]], copy_gbps: float, timing: str = "us") -> list[dict[str, Any]]:
    """The issue's three targets, as ratios measured in this run, on ``timing``: ``"us"`` (eager launches,
    host overhead included) or ``"us_graph"`` (CUDA-graph replay, the kernels' own time)."""
    label = "eager" if timing == "us" else "CUDA graph"
    timed = [r for r in rows if timing in r]
    by_cfg: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in timed:
        by_cfg.setdefault((r["context"], r["batch"]), []).append(r)
    out = []
    library = ("torch sdpa", "flash-attn", "flashinfer (page 16)")
    ratios = []
    for (ctx, batch), rs in sorted(by_cfg.items()):
        best = min((r[timing] for r in rs if r["variant"] in library), default=None)
        ours = next((r[timing] for r in rs if r["variant"] == "kvlab full (bs=16)"), None)
        if best and ours:
            ratios.append((ours / best, ctx, batch))
    if ratios:
        worst = max(ratios)
        out.append({"target": f"kvlab full within 10% of the best library kernel ({label})",
                    "measured": f"worst {worst[0]:.2f}× the best library time ({worst[1] // 1024}K, batch {worst[2]}); "
                                f"median {statistics.median(r[0] for r in ratios):.2f}×",
                    "met": worst[0] <= 1.10})
    speedups = []
    for (ctx, batch), rs in sorted(by_cfg.items()):
        if ctx < 131072:
            continue
        best_full = min((r[timing] for r in rs if r["variant"] in library + ("kvlab full (bs=16)",)), default=None)
        for r in rs:
            if r["variant"] == "kvlab block-route 1/8 (bs=16)" and best_full:
                speedups.append((best_full / r[timing], r["part"], batch))
    for part in ("attention", "centroid scores + top-k + attention"):
        sp = [s for s in speedups if s[1] == part]
        if sp:
            low = min(sp)
            out.append({"target": f"block-route 1/8 ≥ 6× faster than full at 128K ({part}; {label})",
                        "measured": f"min {low[0]:.2f}× (batch {low[2]}), max {max(sp)[0]:.2f}×", "met": low[0] >= 6})
    for (ctx, batch), rs in sorted(by_cfg.items()):
        if ctx < 131072 or batch != 1:
            continue
        part = {r["part"]: r[timing] for r in rs if r["variant"] == "kvlab block-route 1/8 (bs=16)"}
        if "fused scores + top-k" in part and "attention" in part:
            fused, attn = part["fused scores + top-k"], part["attention"]
            out.append({"target": f"fused scoring + top-k ≤ 15% of block-route 1/8's attention at 128K × 1 ({label})",
                        "measured": f"{fused:.1f} µs = {fused / attn:.0%} of {attn:.1f} µs",
                        "met": fused <= 0.15 * attn})
    gbps = "GBps" if timing == "us" else "GBps_graph"
    sel = [r for r in timed if r["variant"].startswith("kvlab block-route") and r["part"] == "attention" and gbps in r]
    if sel and copy_gbps:
        fr = [r[gbps] / copy_gbps for r in sel]
        out.append({"target": f"block-route bandwidth on selected bytes ≥ 70% of copy bandwidth ({label})",
                    "measured": f"median {statistics.median(fr):.0%}, min {min(fr):.0%}, max {max(fr):.0%} "
                                f"of {copy_gbps:.0f} GB/s", "met": statistics.median(fr) >= 0.7})
    return out


# ------------------------------------------------------------------ end to end
def _filled_snapshot(model: Any, context: int, batch: int, reserve: int, device: torch.device) -> Any:
    """A snapshot on the GPU whose store holds ``context`` random tokens per row (decode speed does not
    depend on the values), without a prefill: a 128K prefill of an 8B model is not what is measured."""
    from kvlab.generation import Snapshot
    from kvlab.models.integration import new_store

    cfg = model.config
    store = new_store(cfg, batch, 16, torch.bfloat16, device)
    for layer in store.layers:
        layer.reserve(context + reserve)
        layer.keys.normal_()
        layer.values.normal_()
        pos = layer.positions.view(layer.rows, -1)
        pos[:, :context] = torch.arange(context, device=device)
        layer.lengths = torch.full((layer.rows,), context, dtype=torch.long, device=device)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Snapshot(store=store, queries={}, logits=torch.zeros(batch, cfg.vocab_size, device=device),
                    context_lengths=torch.full((batch,), context, dtype=torch.long), scaling=head_dim**-0.5,
                    num_query_heads=cfg.num_attention_heads, prefill_seconds=0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kvlab_step_seconds(model: Any, method: Any, context: int, batch: int, steps: int, device: torch.device,
                       cuda_graphs: bool = True, warm: int = 8) -> tuple[float, dict[str, Any]]:
    """Seconds per decode step of ``method`` through :func:`kvlab.generation.decode`, steady state: two
    decodes of ``warm`` and ``warm + steps`` tokens on one filled store, the difference of their times
    divided by ``steps`` (what both share -- the method's prefill work, the eager first step, the
    capture of the CUDA graphs -- cancels), after an untimed decode that compiles the kernels."""
    from kvlab.generation import decode

    snapshot = _filled_snapshot(model, context, batch, 2 * warm + steps + 24, device)
    decode(model, snapshot, method, max_new_tokens=4, copy_store=False, cuda_graphs=cuda_graphs)  # kernels built
    times, info = [], {}
    for n in (warm, warm + steps):
        result = decode(model, snapshot, method, max_new_tokens=n, copy_store=False, cuda_graphs=cuda_graphs)
        times.append(result.decode_seconds)
        info = {"graphs": result.graphs, "replays": result.replays}
    return (times[1] - times[0]) / steps, info


def hf_static_step_seconds(model: Any, context: int, batch: int, steps: int, device: torch.device) -> float:
    """Seconds per decode step of transformers' own ``StaticCache`` + SDPA, the step replayed from a CUDA
    graph (cache filled with random K/V, ``context`` tokens in use)."""
    from transformers.cache_utils import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=context + steps + 16)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    probe = torch.zeros(batch, cfg.num_key_value_heads, 1, head_dim, dtype=torch.bfloat16, device=device)
    for layer in cache.layers:
        layer.lazy_initialization(probe, probe)
        layer.keys.normal_()
        layer.values.normal_()
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.full((batch, 1), context, dtype=torch.long, device=device)
    cache_position = torch.full((1,), context, dtype=torch.long, device=device)

    def step() -> None:
        logits = model(input_ids=token, position_ids=position, cache_position=cache_position, past_key_values=cache,
                       use_cache=True).logits
        token.copy_(logits[:, -1:].argmax(-1))
        position.add_(1)
        cache_position.add_(1)

    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        _sync(device)
    return (time.perf_counter() - start) / steps


def e2e_rows(configs: tuple[tuple[int, int], ...], device: torch.device, steps: int, log: Log,
             copy_gbps: float | None = None, model_name: str = "random:llama-3.1-8b", cuda_graphs: bool = True,
             peer: bool = True) -> list[dict[str, Any]]:
    """Decode tokens/s of a random-weight model through kvlab's decode, ``full`` and ``block-route`` at 1/8,
    per (context, batch); with the roofline when ``copy_gbps`` is known, and transformers' static cache
    as the peer on CUDA (``peer``). A batch that does not fit is halved (the row says so)."""
    import kvlab
    from kvlab.methods import make_method

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    log(f"end to end: loading {model_name} ({dtype}) ...")
    model, _ = kvlab.load(model_name, dtype=dtype)
    model = model.to(device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elt = 2 if dtype == "bfloat16" else 4
    rows: list[dict[str, Any]] = []
    for context, batch in configs:
        kv_bytes = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * head_dim * elt
        asked = batch
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            while batch > 1 and kv_bytes * 1.15 > free:
                batch //= 2
                kv_bytes //= 2
        base = {"context": context, "batch": batch, "batch_asked": asked}
        # block-route routes every layer here (dense_layers=0); its summaries are 1/32 of the K/V bytes
        variants = [("full", lambda: make_method("full"), kv_bytes),
                    (f"block-route 1/{round(1 / E2E_BUDGET)}", lambda: make_method(
                        "block-route", budget=E2E_BUDGET, dense_layers=0), kv_bytes * E2E_BUDGET + kv_bytes / 32)]
        for name, make, read in variants:
            try:
                seconds, info = kvlab_step_seconds(model, make(), context, batch, steps, device, cuda_graphs)
                row = {**base, "variant": f"kvlab {name}", "cuda_graphs": cuda_graphs and device.type == "cuda",
                       **info, "ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds,
                       "bytes_per_step": int(weight_bytes + read)}
                if copy_gbps:
                    row["roofline_ms"] = 1e3 * row["bytes_per_step"] / (copy_gbps * 1e9)
                    row["of_roofline"] = row["ms_per_step"] / row["roofline_ms"]
                rows.append(row)
                log(f"  e2e {context // 1024}K × {batch}  {row['variant']:<28} {row['tokens_per_s']:9.1f} tok/s  "
                    f"{row['ms_per_step']:8.2f} ms/step" + (f"  ({row['of_roofline']:.2f}× roofline)"
                                                            if "of_roofline" in row else ""))
            except Exception as exc:  # noqa: BLE001 -- keep the other variants
                rows.append({**base, "variant": f"kvlab {name}", "error": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"  e2e {context // 1024}K × {batch}  kvlab {name:<22} error: {rows[-1]['error']}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if peer and device.type == "cuda":
            try:
                seconds = hf_static_step_seconds(model, context, batch, steps, device)
                rows.append({**base, "variant": "transformers StaticCache + SDPA (CUDA graph)",
                             "ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds})
                log(f"  e2e {context // 1024}K × {batch}  {'transformers StaticCache + SDPA':<28} "
                    f"{batch / seconds:9.1f} tok/s  {1e3 * seconds:8.2f} ms/step")
            except Exception as exc:  # noqa: BLE001 -- the peer is optional
                rows.append({**base, "variant": "transformers StaticCache + SDPA (CUDA graph)",
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]})
                log(f"  e2e {context // 1024}K × {batch}  transformers StaticCache error: {rows[-1]['error']}")
            finally:
                torch.cuda.empty_cache()
    del model
    return rows


def e2e_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The end-to-end goals of issue 13, as ratios from the same run."""
    by = {(r["context"], r["batch"], r["variant"]): r for r in rows if "ms_per_step" in r}
    out = []
    for (ctx, batch, variant), r in sorted(by.items()):
        if variant == "kvlab full" and ctx >= 131072 and batch > 1 and "of_roofline" in r:
            out.append({"target": f"kvlab full within 1.25× of the roofline at 128K × {batch}",
                        "measured": f"{r['of_roofline']:.2f}× ({r['ms_per_step']:.2f} vs {r['roofline_ms']:.2f} ms)",
                        "met": r["of_roofline"] <= 1.25})
        routed = by.get((ctx, batch, f"kvlab block-route 1/{round(1 / E2E_BUDGET)}"))
        if variant == "kvlab full" and ctx >= 131072 and routed:
            goal = 1.5 if batch == 1 else 2.5
            speedup = r["ms_per_step"] / routed["ms_per_step"]
            out.append({"target": f"block-route 1/8 ≥ {goal}× full end to end at 128K × {batch}",
                        "measured": f"{speedup:.2f}×", "met": speedup >= goal})
    return out


# ------------------------------------------------------------------ the whole run
def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def run_gpu_benchmark(contexts: tuple[int, ...] | None = None, batches: tuple[int, ...] | None = None, *,
                      quick: bool = False, e2e: bool = True, tune: bool = True, attention: bool = True,
                      e2e_configs: tuple[tuple[int, int], ...] = E2E_CONFIGS, cuda_graphs: bool = True,
                      e2e_steps: int = 32, warmup: int = 10, iters: int = 50,
                      out_dir: Path | str | None = RESULTS_DIR, log: Log | None = None) -> dict[str, Any]:
    """Run the GPU benchmark; returns the result dict and writes ``<out_dir>/<device>.json``.

    ``quick``: contexts 8K and 32K, batch 1 and 4, end to end at 32K only. ``tune``: first pick the
    paged kernel's launch configuration on this device (:func:`tune_paged_kernel`). ``attention``:
    the kernel table (off: only the device rates and the end to end). ``cuda_graphs``: end to end with
    CUDA graphs (the default) or eager steps. ``log`` receives progress lines (default: print). Raises
    :class:`~kvlab.errors.KVLabError` without a CUDA device.
    """
    log = log or print
    device = require_cuda()
    contexts = tuple(contexts or (QUICK_CONTEXTS if quick else DEFAULT_CONTEXTS))
    batches = tuple(batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES))
    if quick:
        e2e_configs = tuple(c for c in e2e_configs if c[0] <= 32768) or ((32768, 1),)
    for c in contexts:
        check(c >= 1024 and c % 1024 == 0, f"contexts must be multiples of 1024 tokens, got {c}")
    for b in batches:
        check(b >= 1, f"batch sizes must be >= 1, got {b}")
    name = torch.cuda.get_device_name(device)
    log(f"device: {name}")
    rates = device_rates(device, warmup, iters)
    torch.cuda.empty_cache()
    log(f"copy {rates['copy_GBps']:.0f} GB/s, bf16 matmul {rates['matmul_TFLOPs']:.0f} TFLOP/s")
    tuning = tune_paged_kernel(device, warmup, iters, log) if tune else None
    torch.cuda.empty_cache()
    rows: list[dict[str, Any]] = []
    for context in contexts if attention else ():
        for batch in batches:
            rows.extend(attention_rows(context, batch, device, warmup, iters, log))
            torch.cuda.empty_cache()
    for r in rows:
        if "GBps" in r:
            r["of_copy_bw"] = r["GBps"] / rates["copy_GBps"]
    _add_speedups(rows)
    result: dict[str, Any] = {
        "status": "measured",
        "device": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "device_rates": rates,
        "tuning": tuning,
        "setup": {"kv_heads": KV_HEADS, "q_heads": Q_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                  "decode_queries": 1, "warmup": warmup, "iters": iters, "statistic": "median of CUDA-event times",
                  "contexts": list(contexts), "batches": list(batches),
                  "bytes": "K and V of the tokens read + block tables + summaries (when scoring) + query + output"},
        "attention": rows,
        "targets": evaluate_targets(rows, rates["copy_GBps"]) + evaluate_targets(rows, rates["copy_GBps"], "us_graph"),
        "e2e": e2e_rows(tuple(e2e_configs), device, e2e_steps, log, rates["copy_GBps"], cuda_graphs=cuda_graphs)
        if e2e else [],
    }
    result["targets"] += e2e_targets(result["e2e"])
    if out_dir is not None:
        path = Path(out_dir) / f"{device_slug(name)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        result["path"] = str(path)
        log(f"wrote {path}")
    return result


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """``vs_sdpa`` and ``vs_kvlab_full``: how many times faster than those two at the same (context, batch)."""
    ref: dict[tuple[int, int, str], float] = {}
    for r in rows:
        if "us" in r and r["variant"] in ("torch sdpa", "kvlab full (bs=16)"):
            ref[(r["context"], r["batch"], r["variant"])] = r["us"]
    for r in rows:
        if "us" not in r:
            continue
        for key, variant in (("vs_sdpa", "torch sdpa"), ("vs_kvlab_full", "kvlab full (bs=16)")):
            base = ref.get((r["context"], r["batch"], variant))
            r[key] = base / r["us"] if base else None


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The attention rows as printed: one line per (context, batch, variant, part)."""
    out = []
    for r in result["attention"]:
        out.append({"context": f"{r['context'] // 1024}K", "batch": r["batch"],
                    "variant": r["variant"] + ("" if r.get("part", "attention") == "attention" else f" · {r['part']}"),
                    "µs": r.get("us"), "µs graph": r.get("us_graph"), "GB/s": r.get("GBps"),
                    "GB/s graph": r.get("GBps_graph"),
                    "% copy bw": None if r.get("of_copy_bw") is None else 100 * r["of_copy_bw"],
                    "× vs sdpa": r.get("vs_sdpa"), "× vs kvlab full": r.get("vs_kvlab_full"),
                    "note": r.get("error", "")})
    return out


# ------------------------------------------------------------------ docs/benchmarks.md
DOCS_SECTION = "## GPU kernels"
PIVOT_COLUMNS = [
    ("torch sdpa", "attention", "SDPA"),
    ("flash-attn", "attention", "flash-attn"),
    ("flashinfer (page 16)", "attention", "FlashInfer"),
    ("kvlab full (bs=16)", "attention", "kvlab full"),
    ("kvlab block-route 1/4 (bs=16)", "attention", "BR 1/4"),
    ("kvlab block-route 1/8 (bs=16)", "attention", "BR 1/8"),
    ("kvlab block-route 1/16 (bs=16)", "attention", "BR 1/16"),
    ("kvlab block-route 1/8 (bs=16)", "centroid scores + top-k + attention", "BR 1/8 + scoring"),
    ("kvlab gather bs=1 at 1/8", "attention", "bs 1 @1/8"),
    ("kvlab gather bs=64 at 1/8", "attention", "bs 64 @1/8"),
]


def _pivot(result: dict[str, Any], timing: str) -> list[str]:
    """One markdown table: a row per (context, batch), a column per variant, µs by ``timing``."""
    timed = {(r["context"], r["batch"], r["variant"], r.get("part")): r[timing]
             for r in result["attention"] if timing in r}
    configs = sorted({(r["context"], r["batch"]) for r in result["attention"]})
    present = [c for c in PIVOT_COLUMNS if any((ctx, b, c[0], c[1]) in timed for ctx, b in configs)]
    lines = ["| context | batch | " + " | ".join(c[2] for c in present) + " |", "|---|---|" + "---|" * len(present)]
    for ctx, b in configs:
        cells = [f"{timed[(ctx, b, v, p)]:.1f}" if (ctx, b, v, p) in timed else "-" for v, p, _ in present]
        lines.append(f"| {ctx // 1024}K | {b} | " + " | ".join(cells) + " |")
    return lines


def markdown_section(result: dict[str, Any]) -> str:
    """The ``## GPU kernels`` section of docs/benchmarks.md for a measured result (µs, median)."""
    rates = result["device_rates"]
    lines = [DOCS_SECTION, "",
             f"Measured by `kvlab bench gpu` on **{result['device']}** ({result['date']}; torch "
             f"{result['versions'].get('torch')}, triton {result['versions'].get('triton')}). Copy bandwidth "
             f"{rates['copy_GBps']:.0f} GB/s (bytes read + written), bf16 matmul {rates['matmul_TFLOPs']:.0f} "
             "TFLOP/s. Decode attention, one query token, 8 KV × 32 query heads, head_dim 128, bf16; µs per call, "
             "median (BR = block-route, blocks of 16, random selection; bs = block size of a gather at budget "
             "1/8). Raw rows, bytes and GB/s: "
             f"`benchmarks/results/{device_slug(result['device'])}.json`.", ""]
    if any("us_graph" in r for r in result["attention"]):
        lines += ["**Kernel time** (the calls replayed from a CUDA graph, so the host's launch overhead is "
                  "out; what a serving engine that captures decode in graphs sees):", ""]
        lines += _pivot(result, "us_graph") + [""]
    lines += ["**Eager launches** (CUDA events around each Python call: host launch overhead included; "
              "at small sizes this is the host, not the GPU):", ""]
    lines += _pivot(result, "us")
    if result["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    if result["e2e"]:
        lines += ["", "End to end, random-weight llama-3.1-8b, bf16, through `kvlab.generation.decode` (CUDA graphs "
                  "on: captured once per decode, then replayed); roofline = (weights + KV bytes read per step) ÷ copy "
                  "bandwidth:", "", "| context × batch | variant | tok/s | ms/step | roofline ms | × roofline |",
                  "|---|---|---|---|---|---|"]
        for r in result["e2e"]:
            cfg = f"{r['context'] // 1024}K × {r['batch']}"
            if "tokens_per_s" in r:
                roof = f"{r['roofline_ms']:.2f} | {r['of_roofline']:.2f}" if "roofline_ms" in r else "- | -"
                lines.append(f"| {cfg} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {roof} |")
            else:
                lines.append(f"| {cfg} | {r['variant']} | - | {r['error'][:80]} | - | - |")
    return "\n".join(lines) + "\n"


def update_docs(result: dict[str, Any], path: Path | str = Path("docs/benchmarks.md")) -> Path:
    """Replace the ``## GPU kernels`` section of ``path`` (or append it) with ``result``'s tables."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    section = markdown_section(result)
    start = text.find(DOCS_SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(DOCS_SECTION))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
