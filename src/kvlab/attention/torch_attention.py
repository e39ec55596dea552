"""Exact attention over the paged store in plain PyTorch: the CPU path and the reference.

Three reads, each launching only device work (every size comes from the layer's host copies):

- :func:`attend_dense` -- every row owns the same capacity: the layer is one ``[B, H, T, D]`` view,
  one SDPA call (no mask for the common decode step: one query, every row full, no dead slot);
- :func:`attend_ragged` -- rows of different capacities: one SDPA per row over a contiguous slice;
- :func:`attend_plan` -- what a :class:`~kvlab.attention.plans.ReadPlan` selects, with fixed shapes:
  the selected logical blocks of each chunk of rows are copied as whole units of the pool (one memcpy
  per block; a plan of tokens copies single slots) into one reused ``[rows, n, D]`` buffer, then one
  batched masked attention. The width is the plan's, so every step of a decode has one shape.

:func:`attend_plan_reference` gathers a plan's tokens row by row (the slow reference of every plan).
Use :func:`kvlab.attention.attend`, which also picks the Triton kernel on CUDA; these are its torch path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import reduce

import torch

from kvlab.attention.gqa import (
    attend_causal_chunk,
    attend_rows,
    can_attend_causal_chunk,
    expand_groups,
    group_queries,
    ungroup_output,
    visibility,
)
from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore

# The names other modules import from here (one definition each, in kvlab.attention.gqa).
_attend_rows, _expand_groups = attend_rows, expand_groups
ROW_THREADS = 1  # intra-op threads for the small copies and products of a plan (None: torch's setting)
PLAN_CHUNK_ELEMENTS = 1 << 20  # a plan's rows are gathered and attended in chunks of this many K elements
__all__ = ["WORKSPACE", "attend_dense", "attend_plan", "attend_plan_reference", "attend_ragged", "attend_torch",
           "group_queries", "ungroup_output", "visibility"]


class Workspace:
    """Named scratch buffers that grow (by 25 % at least) and are reused across steps.

    On a 2-core CPU a fresh large allocation every step costs more than the attention itself; under
    ``torch.compile`` (whose graphs allocate their own outputs) the buffers are not used.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device, bool], torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat, contiguous tensor of ``numel`` elements (contents undefined)."""
        # a buffer made under inference mode cannot be written outside it: one set of buffers for each
        key = (name, dtype, torch.device(device), torch.is_inference_mode_enabled())
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            size = max(numel, int(1.25 * buf.numel()) if buf is not None else 0)
            buf = torch.empty(size, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]

    def clear(self) -> None:
        self._buffers.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


WORKSPACE = Workspace()


@contextmanager
def row_threads(n: int | None = None) -> Iterator[None]:
    """Run the block with at most ``n`` torch threads (default :data:`ROW_THREADS`), then restore.

    The sparse paths issue a few small ops per row. On a 2-core machine shared with other work, every
    multi-threaded op waits for its second thread to be scheduled, so a loop of small ops costs far
    more with 2 threads than with 1 (measured: 434 ms vs 5 ms of CPU for one 32K step); one thread
    per op is also what a busy server would give each request.
    """
    n = ROW_THREADS if n is None else n
    old = torch.get_num_threads()
    if n is None or n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def attend_torch(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                 plan: ReadPlan | None = None) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, L, D]`` (positions ``[B, L]``) over a layer; returns ``[B, L, Hq, D]``."""
    if plan is not None:
        return attend_plan(layer, query, q_positions, scaling, plan)
    if layer.uniform:
        return attend_dense(layer, query, q_positions, scaling)
    return attend_ragged(layer, query, q_positions, scaling)


def attend_dense(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """Every row owns the same capacity: the layer is one ``[B, H, T, D]`` view, one SDPA call."""
    b, hq, length, _ = query.shape
    h = layer.kv_heads
    k, v, kpos = layer.dense_view()
    q = group_queries(query, h).to(k.dtype)
    # every row full, no dead slot, no window (host copies only)
    plain = layer.sliding_window is None and not layer.holes and all(n == k.shape[2] for n in layer.lengths_host)
    if length == 1 and plain:
        mask = None  # one new token, every row full: it sees everything (the common decode step)
    elif plain and can_attend_causal_chunk(query, kpos, q_positions):  # a CPU prefill chunk: no [G * L, T] mask
        return ungroup_output(attend_causal_chunk(q, k, v, hq // h, scaling), hq, length).to(query.dtype)
    else:
        mask = expand_groups(visibility(kpos, q_positions.to(kpos.device)[:, None, :], layer.sliding_window), hq // h)
    return ungroup_output(attend_rows(q, k, v, mask, scaling), hq, length).to(query.dtype)


def attend_ragged(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """Rows of different capacities: one attention per row, each over a contiguous slice."""
    b, hq, length, d = query.shape
    h = layer.kv_heads
    q = group_queries(query, h).to(layer.dtype)
    out = torch.empty_like(q)
    q_positions = q_positions.to(layer.device)
    for row in range(layer.rows):
        bi, hi = divmod(row, h)
        k, v, kpos = layer.row_view(row)
        mask = expand_groups(visibility(kpos, q_positions[bi], layer.sliding_window), hq // h)
        out[bi, hi] = attend_rows(q[bi, hi], k, v, mask, scaling)
    return ungroup_output(out, hq, length).to(query.dtype)


def copy_unit(layer: LayerStore, block_size: int) -> int:
    """Largest power of two ≤ ``block_size`` that divides every row's first slot and capacity (host).

    Logical blocks of ``block_size`` tokens are read as whole units of this size; a unit never
    crosses into another row, so viewing the pool as ``[units, unit * D]`` is safe.
    """
    bs = layer.block_size
    g = reduce(math.gcd, [s * bs for s in layer.start_host] + [c * bs for c in layer.capacity_host], 0)
    unit = block_size
    while g and g % unit:
        unit //= 2
    return unit


def _gather(pool: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
    """``pool[index]`` (rows of the pool at a flat index), into a reused buffer outside ``torch.compile``."""
    if torch.compiler.is_compiling():
        return pool.index_select(0, index)
    out = WORKSPACE.take(name, index.numel() * pool[0].numel(), pool.dtype, pool.device)
    return torch.index_select(pool, 0, index, out=out.view(index.numel(), *pool.shape[1:]))


def attend_plan(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                plan: ReadPlan) -> torch.Tensor:
    """Attention over what a plan selects, with fixed shapes (see the module docstring); on the CPU with
    :data:`ROW_THREADS` threads (:func:`row_threads`)."""
    if layer.device.type != "cpu" or torch.compiler.is_compiling():
        return _attend_plan(layer, query, q_positions, scaling, plan)
    with row_threads():
        return _attend_plan(layer, query, q_positions, scaling, plan)


def _attend_plan(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                 plan: ReadPlan) -> torch.Tensor:
    b, hq, length, d = query.shape
    h, rows = layer.kv_heads, layer.rows
    g = hq // h
    device = layer.device
    index = plan.index.reshape(rows, -1).to(device).long()
    lengths = layer.lengths
    if plan.kind == "blocks":  # whole units of the pool: one memcpy of unit * D elements each
        bs = plan.block_size or layer.block_size
        unit = copy_unit(layer, bs)
        r = bs // unit
        ids = (layer.row_base // unit)[:, None] + (index.clamp(min=0)[:, :, None] * r
                                                    + torch.arange(r, device=device)).flatten(1)  # [rows, n*r]
        slots = (index[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)  # logical slot of each token
        valid = (index[:, :, None] >= 0).expand(rows, index.shape[1], bs).flatten(1) & (slots < lengths[:, None])
        kpool, vpool = layer.keys.view(-1, unit * d), layer.values.view(-1, unit * d)
        ppool = layer.positions.view(-1, unit)
        # A plan's block may be larger than the store's: the newest one can reach past the last row's capacity,
        # so past the pool. Those slots are masked (slot < length); read the pool's last unit in their place.
        ids = ids.clamp(max=kpool.shape[0] - 1)
    else:  # single slots
        valid = (index >= 0) & (index < lengths[:, None])
        ids = layer.row_base[:, None] + index.clamp(min=0)
        kpool, vpool, ppool = layer.keys, layer.values, layer.positions
    n = valid.shape[1]
    q = group_queries(query, h).to(layer.dtype).reshape(rows, g * length, d)
    vis = valid[:, None, :]  # [rows, 1 or G*L, n]
    if length > 1 or layer.sliding_window is not None or layer.holes:  # positions can hide a token
        kpos = ppool[ids.flatten()].view(rows, n)
        qpos = q_positions.to(device).repeat_interleave(h, 0, output_size=rows)  # [rows, L]
        vis = expand_groups(visibility(kpos, qpos, layer.sliding_window), g) & vis
    out = torch.empty_like(q)
    # rows in chunks of at most PLAN_CHUNK_ELEMENTS gathered K elements: a selection that fits the cache is
    # attended right after it is copied (fixed shapes still: the chunks are set by the plan's width)
    chunk = max(1, min(rows, PLAN_CHUNK_ELEMENTS // max(n * d, 1)))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        sel = ids[r0:r1].flatten()
        k = _gather(kpool, sel, "k").view(r1 - r0, n, d)
        v = _gather(vpool, sel, "v").view(r1 - r0, n, d)
        seen = vis[r0:r1]
        scores = torch.bmm(q[r0:r1], k.transpose(1, 2)).mul_(scaling).masked_fill_(~seen, float("-inf"))
        seen_any = seen.any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~seen_any, 0.0), dim=-1).masked_fill(~seen_any, 0.0)
        torch.bmm(probs.to(v.dtype), v, out=out[r0:r1])
    return ungroup_output(out.view(b, h, g * length, d), hq, length).to(query.dtype)


def attend_plan_reference(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                          plan: ReadPlan) -> torch.Tensor:
    """Attention over the tokens a plan selects, gathered per row (the slow reference for every plan)."""
    b, hq, length, d = query.shape
    h = layer.kv_heads
    q = group_queries(query, h).to(layer.dtype)
    out = torch.empty_like(q)
    slots = plan.token_slots(layer.lengths, layer.block_size)
    for row in range(layer.rows):
        bi, hi = divmod(row, h)
        sel = slots[bi, hi]
        sel = sel[sel >= 0] + layer.start_host[row] * layer.block_size
        k, v, kpos = layer.keys[sel], layer.values[sel], layer.positions[sel]
        mask = expand_groups(visibility(kpos, q_positions[bi], layer.sliding_window), hq // h)
        out[bi, hi] = attend_rows(q[bi, hi], k, v, mask, scaling)
    return ungroup_output(out, hq, length).to(query.dtype)
