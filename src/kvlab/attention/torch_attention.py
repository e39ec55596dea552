"""Exact attention over the paged store in plain PyTorch: the CPU path and the reference.

Three reads, each launching only device work (every size comes from the layer's host copies):

- :func:`attend_dense` -- every row owns the same capacity: the layer is one ``[B, H, T, D]`` view,
  one SDPA call (no mask for the common decode step: one query, every row full, no dead slot);
- :func:`attend_ragged` -- rows of different capacities: one SDPA per row over a contiguous slice;
- :func:`attend_plan` -- what a :class:`~kvlab.attention.plans.ReadPlan` selects, with fixed shapes:
  the selected logical blocks of every row are copied as whole units of the pool (one memcpy per
  block; a plan of tokens copies single slots) into one ``[rows, n, D]`` buffer, then one batched
  masked attention. The width is the plan's, so a step of a captured decode always has one shape.

:func:`attend_plan_reference` gathers a plan's tokens row by row (the slow reference of every plan).
Use :func:`kvlab.attention.attend`, which also picks the Triton kernel on CUDA; these are its torch path.
"""

from __future__ import annotations

import math
from functools import reduce

import torch

from kvlab.attention.gqa import attend_rows, expand_groups, group_queries, ungroup_output, visibility
from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore

# The names other modules import from here (one definition each, in kvlab.attention.gqa).
_attend_rows, _expand_groups = attend_rows, expand_groups
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
    full_rows = all(n == k.shape[2] for n in layer.lengths_host)
    if length == 1 and layer.sliding_window is None and full_rows and not layer.holes:
        mask = None  # one new token, every row full: it sees everything (the common decode step)
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
    """Attention over what a plan selects, with fixed shapes (see the module docstring)."""
    b, hq, length, d = query.shape
    h, rows = layer.kv_heads, layer.rows
    g = hq // h
    device = layer.device
    index = plan.index.reshape(rows, -1).to(device).long()
    lengths = layer.lengths
    if plan.kind == "blocks":
        bs = plan.block_size or layer.block_size
        unit = copy_unit(layer, bs)
        r = bs // unit
        units = (index.clamp(min=0)[:, :, None] * r + torch.arange(r, device=device)).flatten(1)  # [rows, n*r]
        gid = (layer._row_base // unit)[:, None] + units
        slots = (index[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)  # logical slot of each token
        valid = (index[:, :, None] >= 0).expand(rows, index.shape[1], bs).flatten(1) & (slots < lengths[:, None])
        n = index.shape[1] * bs
        k = _gather(layer.keys.view(-1, unit * d), gid.flatten(), "k").view(rows, n, d)
        v = _gather(layer.values.view(-1, unit * d), gid.flatten(), "v").view(rows, n, d)
        need_pos = length > 1 or layer.sliding_window is not None or layer.holes
        kpos = layer.positions.view(-1, unit)[gid.flatten()].view(rows, n) if need_pos else None
    else:
        valid = (index >= 0) & (index < lengths[:, None])
        phys = (layer._row_base[:, None] + index.clamp(min=0)).flatten()
        n = index.shape[1]
        k = _gather(layer.keys, phys, "k").view(rows, n, d)
        v = _gather(layer.values, phys, "v").view(rows, n, d)
        need_pos = length > 1 or layer.sliding_window is not None or layer.holes
        kpos = layer.positions[phys].view(rows, n) if need_pos else None
    q = group_queries(query, h).to(layer.dtype).reshape(rows, g * length, d)
    vis = valid[:, None, :]  # [rows, 1 or G*L, n]
    if kpos is not None:
        qpos = q_positions.to(device).repeat_interleave(h, 0, output_size=rows)  # [rows, L]
        seen = visibility(kpos, qpos, layer.sliding_window)  # [rows, L, n]
        vis = expand_groups(seen, g) & vis
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scaling).masked_fill_(~vis, float("-inf"))
    seen_any = vis.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen_any, 0.0), dim=-1).masked_fill(~seen_any, 0.0)
    out = torch.bmm(probs.to(v.dtype), v).view(b, h, g * length, d)
    return ungroup_output(out, hq, length).to(query.dtype)


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
