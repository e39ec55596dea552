"""Exact attention probabilities over the store: what the scoring methods, the oracles and the experiments
measure attention with (attention *outputs* are :func:`kvlab.attention.attend`).

- :func:`padded_layer` -- a layer's keys ``[B, H, T, D]`` and positions ``[B, H, T]`` (-1 past a row's
  length and on dead slots): views when the layout is uniform, one gather otherwise;
- :func:`attention_probs` -- softmax of observed queries ``[B, Hq, w, D]`` over the stored keys,
  GQA-grouped (``[B, H, G, w, T]``, query head ``h * G + g`` serves KV head ``h``: K/V are never repeated),
  causal by position: the eviction scores (SnapKV, H2O, TOVA, KV-Compress);
- :func:`attention_mass` and :func:`mass_recall` -- the true attention of a decode query, row by row in
  fp32 over every stored token, and the share of it a read plan covers: the oracles and the routers'
  recall diagnostic (a full attention pass each);
- :func:`attention_weights` -- one sequence's attention ``[Hq, L, T]`` per query head, sliding windows
  included: the locality experiments.
"""

from __future__ import annotations

import torch

from kvlab.attention.gqa import query_rows, visibility
from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore


def padded_layer(layer: LayerStore, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, T, D]`` and positions ``[B, H, T]`` of a layer; ``T`` is ``width`` (default: the
    longest row, from the host copy), -1 pads (and marks dead slots)."""
    device = layer.device
    t = layer.max_length if width is None else width
    idx = torch.arange(t, device=device)
    in_use = layer.in_use(t)  # [rows, T]
    if layer.uniform and t <= layer.max_capacity_tokens:
        k, _, pos = layer.dense_view(t)
    else:
        slots = layer.row_base[:, None] + idx[None, :]
        slots = torch.where(in_use, slots, torch.zeros_like(slots))
        k = layer.keys[slots].view(layer.batch, layer.kv_heads, t, layer.head_dim)
        pos = layer.positions[slots].view(layer.batch, layer.kv_heads, t)
    pos = torch.where(in_use.view_as(pos), pos, torch.full_like(pos, -1))
    return k, pos


def attention_probs(layer: LayerStore, queries: torch.Tensor, q_pos: torch.Tensor, scaling: float,
                    keys: torch.Tensor | None = None, k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``[B, H, G, w, T]`` (float32) of ``queries`` ``[B, Hq, w, D]`` over the layer
    (``keys``/``k_pos``: its :func:`padded_layer`, when the caller has it already).

    A query at position ``p`` sees stored keys at positions ``0 <= k <= p``; masked entries are 0.
    """
    if keys is None or k_pos is None:
        keys, k_pos = padded_layer(layer)
    q_pos = q_pos.to(k_pos.device)  # decode positions may come from the host
    b, hq, w, d = queries.shape
    h = layer.kv_heads
    g = hq // h
    q = queries.reshape(b, h, g * w, d).to(keys.dtype)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # [B, H, G*w, T]
    logits = logits.view(b, h, g, w, -1)
    visible = (k_pos[:, :, None, None, :] >= 0) & (k_pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a query that sees nothing contributes nothing


def attention_mass(layer: LayerStore, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of each query head over each row's logical slots: ``[B, H_kv, G, T]``.

    ``T`` is the longest row (0 past a row's length); with several queries per row their mean.
    Every stored token is taken as visible (a decode step on a global layer).
    """
    b, hq, length, d = query.shape
    h = layer.kv_heads
    g = hq // h
    t = layer.max_length
    out = torch.zeros(b, h, g, t, device=layer.keys.device)
    q = query_rows(query, h)
    for row in range(layer.rows):
        bi, hi = divmod(row, h)
        k, _, _ = layer.row_view(row)
        p = torch.softmax((q[row] @ k.float().T) * scaling, dim=-1)  # [G * L, T_row]
        out[bi, hi, :, : k.shape[0]] = p.view(g, length, -1).mean(1)
    return out


def mass_recall(layer: LayerStore, query: torch.Tensor, scaling: float, plan: ReadPlan | None) -> torch.Tensor:
    """Share of each query head's true attention mass that ``plan`` reads: ``[B, Hq]`` (1 for ``None``)."""
    b, hq = query.shape[:2]
    if plan is None:
        return torch.ones(b, hq)
    mass = attention_mass(layer, query, scaling)  # [B, H, G, T]
    slots = plan.token_slots(layer.lengths.to(plan.index.device), layer.block_size)  # [B, H, n]
    slots = torch.where(slots < mass.shape[-1], slots, -1)
    idx = slots.clamp(min=0)[:, :, None, :].expand(*mass.shape[:3], slots.shape[-1])
    picked = mass.gather(-1, idx) * (slots >= 0)[:, :, None, :]
    return picked.sum(-1).reshape(b, hq)


def attention_weights(layer: LayerStore, queries: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                      batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention ``[Hq, L, T]`` of observed ``queries [B, Hq, L, D]`` (positions ``[L]``)
    over one sequence's stored keys, and the key positions ``[Hq, T]`` (-1 for empty slots), in fp32 on the
    CPU; a sliding-window layer's window applies."""
    h = layer.kv_heads
    rows = [batch_index * h + i for i in range(h)]
    t = max(layer.lengths_host[r] for r in rows)
    keys = torch.zeros(h, t, layer.head_dim, dtype=torch.float32)
    kpos = torch.full((h, t), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        k, _, p = layer.row_view(row)
        keys[i, :k.shape[0]] = k.float()
        kpos[i, :k.shape[0]] = p
    q = queries[batch_index].float()  # [Hq, L, D]
    hq = q.shape[0]
    g = hq // h
    kk = keys.repeat_interleave(g, 0)  # [Hq, T, D]
    pp = kpos.repeat_interleave(g, 0)  # [Hq, T]
    scores = torch.einsum("hld,htd->hlt", q, kk) * scaling
    mask = visibility(pp, q_positions[None, :].expand(hq, -1), layer.sliding_window)  # [Hq, L, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, -1).nan_to_num(0.0)
    return w, pp
