"""Exact attention over part of each row of the store, on the CPU, row by row: the readers of the access
experiments (``kvlab bench access``, ``kvlab bench attention``), which compare how memory is read.

Both read paths copy, row by row, what a plan selects into one preallocated buffer and attend over it
(softmax(q·Kᵀ)·V), so they do the same arithmetic and differ only in how memory is read:

- :func:`attend_blocks` reads whole blocks. A row of the store is contiguous, so a logical block is
  one contiguous slice. ``mode="blocks"`` copies the selected blocks with one ``index_select`` over
  the pool viewed as ``[units, unit * D]`` (one memcpy per block, consecutive blocks land next to each
  other); ``mode="runs"`` first merges consecutive blocks into runs (:func:`merge_runs`) and copies
  each run as one slice.
- :func:`attend_tokens` gathers single tokens (``index_select`` over ``[slots, D]``). A token plan
  whose slots form long runs (``cluster-route --relayout``) is copied run by run instead
  (``mode="auto"``); ``mode="gather"`` / ``"runs"`` force one way.

Buffers come from :data:`~kvlab.attention.torch_attention.WORKSPACE`, which grows and is reused. These
readers size their copies from the device (``tolist`` of the counts per row), so they are not the
decode path: a decode step reads through :func:`kvlab.attention.attend`, whose torch path
(:func:`~kvlab.attention.torch_attention.attend_plan`) copies the same units with fixed shapes.

Masks: a decode step (one query per sequence) sees every stored token of a global layer (keys are
earlier than the query), so no mask is built; with several queries per row or a sliding window,
visibility comes from the gathered positions as in :mod:`kvlab.attention.gqa`.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvlab.attention.gqa import group_queries, ungroup_output
from kvlab.attention.torch_attention import ROW_THREADS, WORKSPACE, copy_unit, row_threads
from kvlab.cache.store import LayerStore
from kvlab.errors import check
from kvlab.kernels.selection import ascending

BATCH_ROWS_MAX_ELEMENTS = 1 << 20  # selections up to this many K elements in all rows are attended in one batch
RUN_MIN_TOKENS = 16  # mean run length from which a token plan is copied run by run in mode="auto"
__all__ = ["ROW_THREADS", "WORKSPACE", "attend_blocks", "attend_tokens", "copy_unit", "merge_runs", "row_threads"]


def merge_runs(units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending unit (or token) ids ``[n]`` -> ``(starts, counts)`` of runs of consecutive ids."""
    n = units.numel()
    if n == 0:
        return units, units
    brk = torch.ones(n, dtype=torch.bool, device=units.device)
    brk[1:] = units[1:] != units[:-1] + 1
    first = brk.nonzero().flatten()
    counts = torch.diff(first, append=torch.tensor([n], device=units.device))
    return units[first], counts


def _compact(units: torch.Tensor, limit: torch.Tensor, unit: int) -> torch.Tensor:
    """Drop units that start at or past a row's length and push the -1 padding to the end."""
    units = torch.where((units >= 0) & (units * unit < limit[:, None]), units, -1)
    if bool(((units[:, 1:] >= 0) & (units[:, :-1] < 0)).any()):
        units = ascending(units)
    return units


def _attend_units(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                  units: torch.Tensor, unit: int, copy: Literal["gather", "runs"]) -> torch.Tensor:
    with row_threads():
        return _attend_units_rows(layer, query, q_positions, scaling, units, unit, copy)


def _attend_units_rows(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                       units: torch.Tensor, unit: int, copy: Literal["gather", "runs"]) -> torch.Tensor:
    """Attention over logical units ``[rows, m]`` (ascending, -1 padded) of ``unit`` tokens per row.

    Row by row: the row's selection is copied into one reused buffer (small enough to stay in cache
    for the attention that reads it right after), then attended.
    """
    b, hq, length, d = query.shape
    h, rows = layer.kv_heads, layer.rows
    g = hq // h
    q = group_queries(query, h).to(layer.dtype)  # [B, H, G*L, D]
    out = torch.empty_like(q)
    lengths, first_slot = layer.lengths.to(units.device), (layer.start * layer.block_size).to(units.device)
    units = _compact(units.reshape(rows, -1).to(torch.long), lengths, unit)
    counts = (units >= 0).sum(1)
    last = units.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
    overhang = torch.where(counts > 0, ((last + 1) * unit - lengths).clamp(min=0), 0)
    n_tok = (counts * unit - overhang).tolist()  # tokens read per row (a prefix of the row's buffer)
    width = max(units.shape[1], 1) * unit
    kbuf = WORKSPACE.take("k", width * d, layer.dtype, layer.device).view(-1, unit * d)
    vbuf = WORKSPACE.take("v", width * d, layer.dtype, layer.device).view(-1, unit * d)
    need_pos = length > 1 or layer.sliding_window is not None
    pbuf = WORKSPACE.take("p", width, torch.long, layer.device).view(-1, unit) if need_pos else None
    base = [s * layer.block_size for s in layer.start_host]  # first slot of each row
    kpool, vpool = layer.keys.view(-1, unit * d), layer.values.view(-1, unit * d)
    ppool = layer.positions.view(-1, unit)
    counts_l = counts.tolist()
    if (copy == "gather" and pbuf is None and len(set(n_tok)) == 1 and len(set(counts_l)) == 1
            and rows * n_tok[0] * d <= BATCH_ROWS_MAX_ELEMENTS):
        # small selections, same size in every row: one batched copy and attention for all rows
        # (a per-row loop of tiny ops costs more than the work; large ones stay row by row for the cache)
        c, n = counts_l[0], n_tok[0]
        gid = (units[:, :c] + (first_slot // unit)[:, None]).flatten()
        kb = WORKSPACE.take("kb", rows * c * unit * d, layer.dtype, layer.device).view(-1, unit * d)
        vb = WORKSPACE.take("vb", rows * c * unit * d, layer.dtype, layer.device).view(-1, unit * d)
        torch.index_select(kpool, 0, gid, out=kb)
        torch.index_select(vpool, 0, gid, out=vb)
        k = kb.view(rows, c * unit, d)[:, :n]
        v = vb.view(rows, c * unit, d)[:, :n]
        qr = q.reshape(rows, g * length, d)
        p = torch.softmax(torch.bmm(qr, k.transpose(1, 2)).mul_(scaling), dim=-1)
        torch.bmm(p, v, out=out.view(rows, g * length, d))
        return ungroup_output(out, hq, length).to(query.dtype)
    for row in range(rows):
        bi, hi = divmod(row, h)
        c, n = counts_l[row], n_tok[row]
        sel = units[row, :c]
        if copy == "gather":
            gid = sel + base[row] // unit
            torch.index_select(kpool, 0, gid, out=kbuf[:c])
            torch.index_select(vpool, 0, gid, out=vbuf[:c])
            if pbuf is not None:
                torch.index_select(ppool, 0, gid, out=pbuf[:c])
        else:
            kflat, vflat = kbuf.view(-1, d), vbuf.view(-1, d)
            pflat = pbuf.view(-1) if pbuf is not None else None
            starts, runs = merge_runs(sel)
            offset = 0
            for s, r in zip((starts * unit).tolist(), (runs * unit).tolist(), strict=True):
                r = min(r, n - offset)
                src = slice(base[row] + s, base[row] + s + r)
                kflat[offset: offset + r] = layer.keys[src]
                vflat[offset: offset + r] = layer.values[src]
                if pflat is not None:
                    pflat[offset: offset + r] = layer.positions[src]
                offset += r
        k = kbuf.view(-1, d)[:n]
        v = vbuf.view(-1, d)[:n]
        qr = q[bi, hi]  # [G*L, D]
        if pbuf is None:
            # one query per sequence on a global layer: every stored key is visible
            p = torch.softmax((qr @ k.T).mul_(scaling), dim=-1)
            torch.matmul(p, v, out=out[bi, hi])
        else:
            kpos = pbuf.view(-1)[:n]
            qp = q_positions[bi][:, None]  # [L, 1]
            vis = (kpos[None, :] >= 0) & (kpos[None, :] <= qp)
            if layer.sliding_window is not None:
                vis &= (qp - kpos[None, :]) < layer.sliding_window
            vis = vis.unsqueeze(0).expand(g, length, n).reshape(g * length, n)
            vis = vis | ~vis.any(-1, keepdim=True)  # a query that sees nothing attends to slot 0, as elsewhere
            out[bi, hi] = torch.nn.functional.scaled_dot_product_attention(qr, k, v, attn_mask=vis, scale=scaling)
    return ungroup_output(out, hq, length).to(query.dtype)


def attend_blocks(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                  index: torch.Tensor, block_size: int | None = None,
                  mode: Literal["auto", "blocks", "runs"] = "auto") -> torch.Tensor:
    """Exact attention over logical blocks ``index`` ``[B, H_kv, n]`` (ascending, -1 padded) of each row.

    ``block_size``: tokens per logical block (default: the store's). Returns ``[B, L, Hq, D]``.
    """
    block_size = block_size or layer.block_size
    check(block_size > 0 and block_size & (block_size - 1) == 0,
          f"block_size must be a power of two, got {block_size}")
    check(mode in ("auto", "blocks", "runs"), f"mode must be auto, blocks or runs, got {mode!r}")
    unit = copy_unit(layer, block_size)
    idx = index.reshape(layer.rows, -1).to(torch.long)
    r = block_size // unit
    if r > 1:
        units = idx[:, :, None] * r + torch.arange(r, device=idx.device)
        units = torch.where(idx[:, :, None] >= 0, units, -1).flatten(1)
    else:
        units = idx
    return _attend_units(layer, query, q_positions, scaling, units, unit, "runs" if mode == "runs" else "gather")


def attend_tokens(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                  index: torch.Tensor, mode: Literal["auto", "gather", "runs"] = "auto") -> torch.Tensor:
    """Exact attention over logical token slots ``index`` ``[B, H_kv, n]`` (ascending, -1 padded).

    ``mode="auto"`` copies run by run when the slots form runs of at least :data:`RUN_MIN_TOKENS`
    tokens on average, and gathers token by token otherwise.
    """
    check(mode in ("auto", "gather", "runs"), f"mode must be auto, gather or runs, got {mode!r}")
    idx = index.reshape(layer.rows, -1).to(torch.long)
    if mode == "auto":
        valid = idx >= 0
        n = int(valid.sum())
        breaks = int((valid[:, 1:] & (idx[:, 1:] != idx[:, :-1] + 1)).sum()) + int(valid[:, 0].sum())
        mode = "runs" if n >= RUN_MIN_TOKENS * max(breaks, 1) else "gather"
    return _attend_units(layer, query, q_positions, scaling, idx, 1, mode)
