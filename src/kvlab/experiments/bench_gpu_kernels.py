"""The decode-attention kernel table of ``kvlab bench gpu``: one new token, 8 KV × 32 query heads, head_dim
128, bf16, over contexts and batches -- torch SDPA (the GQA group's queries as rows over its KV head),
flash-attn and FlashInfer when installed, kvlab's paged kernel over all blocks, ``block-route`` at budgets
1/4, 1/8, 1/16 (attention over the selected blocks; scoring + top-k + attention, unfused -- the scoring
kernel, then a torch top-k -- and with block-route's fused scoring + top-k kernel; the fused selection
alone), and block size 1 / 16 / 64 at the same 1/8 budget. Time is the median of CUDA-event timings after
a warm-up, with inputs rotated over enough copies that they do not fit in L2; each row also reports the
bytes the variant must read (K and V of the tokens it reads, plus block tables, summaries, query,
output) and the bandwidth achieved on them. Selections are random: the kernels' cost does not depend on
which blocks are chosen, only on how many and how scattered.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kvlab.experiments.gpu_timing import Log, cuda_time_us, graph_time_us, rotation

DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 4, 16)
QUICK_CONTEXTS = (8192, 32768)
QUICK_BATCHES = (1, 4)
BUDGETS = (1 / 4, 1 / 8, 1 / 16)
BLOCK_SIZES = (1, 16, 64)
KV_HEADS, Q_HEADS, HEAD_DIM = 8, 32, 128


def _random_lists(rows: int, tokens: int, block_size: int, budget: float, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``budget`` of each row's blocks chosen at random: physical ids ``[rows, k]`` (ascending), lens, k."""
    n = tokens // block_size
    k = max(1, round(n * budget))
    chosen = torch.rand(rows, n, device=device).argsort(-1)[:, :k].sort(-1).values
    table = (chosen + torch.arange(rows, device=device)[:, None] * n).int()
    return table, torch.full((rows,), k * block_size, dtype=torch.int32, device=device), k


def decode_inputs(batch: int, context: int, copies: int, device: torch.device
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``copies`` random bf16 K and V pools ``[B * H_kv * context, D]`` and one-token queries ``[B, H_kv, G, D]``
    (rotated between calls so they do not stay in L2), and one output buffer."""
    h, g, d, dt = KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM, torch.bfloat16
    slots = batch * h * context
    keys = [torch.randn(slots, d, device=device, dtype=dt) for _ in range(copies)]
    values = [torch.randn(slots, d, device=device, dtype=dt) for _ in range(copies)]
    queries = [torch.randn(batch, h, g, d, device=device, dtype=dt) for _ in range(copies)]
    return keys, values, queries, torch.empty(batch, h, g, d, device=device, dtype=dt)


def full_lists(rows: int, context: int, device: torch.device, block_size: int = 16
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block of every row, rows consecutive in the pool: ``(table [rows, n] int32, lengths [rows] int32)``."""
    nb = context // block_size
    table = (torch.arange(rows, device=device)[:, None] * nb + torch.arange(nb, device=device)[None, :]).int()
    return table, torch.full((rows,), context, dtype=torch.int32, device=device)


def attention_rows(context: int, batch: int, device: torch.device, warmup: int, iters: int,
                   log: Log) -> list[dict[str, Any]]:
    """Time every variant at one (context, batch); see the module docstring."""
    from kvlab.kernels import dispatch
    from kvlab.kernels.block_scoring import block_scores, block_select, fits
    from kvlab.kernels.paged_attention import paged_decode_attention

    h, hq, d, dt = KV_HEADS, Q_HEADS, HEAD_DIM, torch.bfloat16
    rows, scale, elt = batch * KV_HEADS, HEAD_DIM**-0.5, 2
    slots = rows * context
    kv_bytes = 2 * slots * d * elt
    q_bytes = 2 * batch * hq * d * elt  # query read + output written
    copies = rotation(kv_bytes, device)
    free, _ = torch.cuda.mem_get_info(device)
    if copies * kv_bytes * 1.3 > free:
        copies = 1
    if kv_bytes * 1.3 > free:
        return [{"context": context, "batch": batch, "variant": "all", "error":
                 f"needs {kv_bytes / 1e9:.1f} GB of K/V, {free / 1e9:.1f} GB free"}]
    keys, values, queries, out = decode_inputs(batch, context, copies, device)
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
    table, lens = full_lists(rows, context, device)
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


def add_speedups(rows: list[dict[str, Any]]) -> None:
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
