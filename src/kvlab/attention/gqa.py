"""GQA grouping and position visibility, shared by every attention path over the store.

GQA is handled by grouping query heads under their KV head (``[B, H_kv, G * L, D]``), so keys and
values are never repeated. Causality, left padding, sliding windows and eviction are all expressed
through the original positions kept with every slot: a query at position ``p`` sees a stored key at
position ``k`` iff ``0 <= k <= p`` (and ``p - k < window`` on sliding-window layers); a dead or empty
slot has position -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def query_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, L, D]`` -> ``[rows, G * L, D]`` float32: :func:`group_queries` with one row per (sequence,
    KV head), as the store's rows."""
    b, hq, length, d = query.shape
    return group_queries(query, kv_heads).reshape(b * kv_heads, (hq // kv_heads) * length, d).float()


def ungroup_output(out: torch.Tensor, q_heads: int, length: int) -> torch.Tensor:
    """``[B, H_kv, G * L, D]`` -> ``[B, L, Hq, D]`` (the layout transformers' attention returns)."""
    b, _, _, d = out.shape
    return out.reshape(b, q_heads, length, d).transpose(1, 2)


def expand_groups(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``[..., L, T]`` -> ``[..., G * L, T]`` matching :func:`group_queries`'s row order."""
    *lead, length, t = mask.shape
    return mask.unsqueeze(-3).expand(*lead, groups, length, t).reshape(*lead, groups * length, t)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scaling: float) -> torch.Tensor:
    """SDPA of grouped queries over keys and values; a query that sees no key at all (a padded query)
    attends to slot 0 instead of producing NaN."""
    if mask is not None:
        mask = mask | ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
