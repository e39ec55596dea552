"""Exact attention over the paged store, in plain PyTorch (the CPU path and the reference).

GQA is handled by grouping query heads under their KV head (``[B, H_kv, G * L, D]``), so keys and
values are never repeated. Causality, left padding, sliding windows and eviction are all expressed
through the original positions kept with every slot: a query at position ``p`` sees a stored key at
position ``k`` iff ``0 <= k <= p`` (and ``p - k < window`` on sliding-window layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore


def visibility(key_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask ``[..., L, T]`` from key positions ``[..., T]`` and query positions ``[..., L]``."""
    k = key_pos[..., None, :]
    q = q_pos[..., :, None]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    return mask


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, L, D]`` -> ``[B, H_kv, G * L, D]`` (query head ``h * G + g`` serves KV head ``h``)."""
    b, hq, length, d = query.shape
    return query.reshape(b, kv_heads, (hq // kv_heads) * length, d)


def ungroup_output(out: torch.Tensor, q_heads: int, length: int) -> torch.Tensor:
    """``[B, H_kv, G * L, D]`` -> ``[B, L, Hq, D]`` (the layout transformers' attention returns)."""
    b, _, _, d = out.shape
    return out.reshape(b, q_heads, length, d).transpose(1, 2)


def _expand_groups(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``[..., L, T]`` -> ``[..., G * L, T]`` matching :func:`group_queries`'s row order."""
    *lead, length, t = mask.shape
    return mask.unsqueeze(-3).expand(*lead, groups, length, t).reshape(*lead, groups * length, t)


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor:
    if mask is not None:
        # A query that sees no key at all (a padded query) attends to slot 0 instead of producing NaN.
        mask = mask | ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def attend(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
           plan: ReadPlan | None = None) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, L, D]`` (positions ``[B, L]``) over a layer; returns ``[B, L, Hq, D]``."""
    override = getattr(layer, "attend_override", None)  # a layer that attends in its own (compressed) space
    if override is not None:
        return override(query, q_positions, scaling, plan)
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
    full_rows = bool((layer.lengths == k.shape[2]).all())
    if length == 1 and layer.sliding_window is None and full_rows:
        mask = None  # one new token, every row full: it sees everything (the common decode step)
    else:
        mask = _expand_groups(visibility(kpos, q_positions[:, None, :], layer.sliding_window), hq // h)
    return ungroup_output(_attend_rows(q, k, v, mask, scaling), hq, length).to(query.dtype)


def attend_ragged(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """Rows of different capacities: one attention per row, each over a contiguous slice."""
    b, hq, length, d = query.shape
    h = layer.kv_heads
    q = group_queries(query, h).to(layer.dtype)
    out = torch.empty_like(q)
    for row in range(layer.rows):
        bi, hi = divmod(row, h)
        k, v, kpos = layer.row_view(row)
        mask = _expand_groups(visibility(kpos, q_positions[bi], layer.sliding_window), hq // h)
        out[bi, hi] = _attend_rows(q[bi, hi], k, v, mask, scaling)
    return ungroup_output(out, hq, length).to(query.dtype)


def attend_plan(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                plan: ReadPlan) -> torch.Tensor:
    """Attention over what a plan selects: blocks as contiguous runs, tokens by gather (:mod:`.sparse`)."""
    from kvlab.attention.sparse import attend_blocks, attend_tokens

    if plan.kind == "blocks":
        return attend_blocks(layer, query, q_positions, scaling, plan.index, plan.block_size or layer.block_size)
    return attend_tokens(layer, query, q_positions, scaling, plan.index)


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
        sel = sel[sel >= 0] + int(layer.start[row]) * layer.block_size
        k, v, kpos = layer.keys[sel], layer.values[sel], layer.positions[sel]
        mask = _expand_groups(visibility(kpos, q_positions[bi], layer.sliding_window), hq // h)
        out[bi, hi] = _attend_rows(q[bi, hi], k, v, mask, scaling)
    return ungroup_output(out, hq, length).to(query.dtype)
