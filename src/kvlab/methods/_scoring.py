"""Scoring helpers shared by the eviction methods.

Everything works per layer on the paged store, one *row* per (sequence, KV head) (``row = b * H + h``):

- :func:`observed_queries` -- the last ``w`` prefill queries of a layer and their positions, with the
  checks every observation-window method needs (their attention over the stored keys is
  :func:`kvlab.attention.probs.attention_probs`, over :func:`~kvlab.attention.probs.padded_layer`);
- :func:`snapkv_scores` -- SnapKV's pooled window attention (the exact kvpress convention);
- :func:`keep_top` and :func:`evict` -- per-row scores to a keep mask, then a real repack that frees
  the evicted blocks (eviction at prefill end);
- :func:`mark_dead` and :func:`maintain` -- decode-time eviction without a copy per step: a step marks
  each row's evicted slot dead (position -1, on the device, fixed shape), and every
  :data:`COMPACT_EVERY` steps the host compacts the dead slots away in place (``LayerStore.compact``).
  A row then holds at most its kept tokens plus ``compact_every`` dead slots (plus the step's new
  token), where repacking at every step held exactly the kept tokens but copied all of them each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.attention.probs import attention_probs, padded_layer
from kvlab.cache.store import LayerStore
from kvlab.errors import check
from kvlab.methods.base import Method, PrefillContext

COMPACT_EVERY = 32  # decode steps of marked evictions between in-place compactions (the default)


def observed_queries(ctx: PrefillContext, layer_idx: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``window`` prefill queries ``[B, Hq, w, D]`` of a layer and their positions ``[B, w]``
    (on the queries' device).

    Raises :class:`~kvlab.errors.KVLabError` when a sequence is shorter than the window (its window
    would hold padding queries) or fewer queries were observed than asked for.
    """
    shortest = int(ctx.context_lengths.min())
    check(shortest >= window,
          f"observation window of {window} tokens is longer than the context ({shortest} tokens); "
          f"lower the window or use a longer prompt")
    queries = ctx.queries.get(layer_idx)
    check(queries is not None and queries.shape[2] >= window,
          f"the method needs the last {window} prefill queries of layer {layer_idx}, but "
          f"{0 if queries is None else queries.shape[2]} were observed (prefill with observe >= {window})")
    device = queries.device
    q_pos = ctx.context_lengths.to(device)[:, None] - window + torch.arange(window, device=device)[None, :]
    return queries[:, :, -window:], q_pos


def snapkv_scores(layer: LayerStore, ctx: PrefillContext, layer_idx: int, window: int,
                  kernel_size: int) -> torch.Tensor:
    """SnapKV scores ``[B, H, T]`` with kvpress's conventions (``SnapKVPress.score``, kvpress 0.5.5).

    The window's attention to the keys before it, averaged over the window queries, average-pooled
    along the sequence (zero padding, the pad counted), then averaged over the GQA group. The window
    itself gets ``+inf`` (always kept); padding slots get ``-inf``.
    """
    queries, q_pos = observed_queries(ctx, layer_idx, window)
    keys, k_pos = padded_layer(layer)
    q_pos = q_pos.to(k_pos.device)
    probs = attention_probs(layer, queries, q_pos, ctx.scaling, keys, k_pos)  # [B, H, G, w, T]
    first_window_pos = q_pos[:, 0].view(-1, 1, 1)  # [B, 1, 1]
    before = (k_pos >= 0) & (k_pos < first_window_pos)  # [B, H, T] the keys before the window
    scores = probs.mean(dim=-2)  # [B, H, G, T]
    scores = scores * before[:, :, None, :]  # zero outside the pooled range = avg_pool1d's zero padding
    b, h, g, t = scores.shape
    if kernel_size > 1:
        scores = F.avg_pool1d(scores.reshape(b * h * g, 1, t), kernel_size=kernel_size, padding=kernel_size // 2,
                              stride=1).view(b, h, g, -1)[..., :t]
    scores = scores.mean(dim=2)
    scores = torch.where(before, scores, torch.full_like(scores, float("inf")))
    return torch.where(k_pos >= 0, scores, torch.full_like(scores, float("-inf")))


def keep_top(scores: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[rows, T]`` on the scores' device: the ``n_keep[row]`` highest scores of each row
    (``-inf`` slots never); ``n_keep`` may live on another device (it is moved)."""
    rows, t = scores.shape
    device = scores.device
    k = int(n_keep.max()) if rows else 0
    k = min(k, t)
    top = torch.topk(scores, k, dim=-1).indices  # [rows, k]
    chosen = torch.arange(k, device=device)[None, :] < n_keep.to(device)[:, None]
    keep = torch.zeros(rows, t, dtype=torch.bool, device=device)
    keep.scatter_(1, top, chosen)
    return keep & (scores > float("-inf"))


def evict(layer: LayerStore, keep: torch.Tensor) -> None:
    """Drop every slot not in ``keep`` ``[rows, T]`` and give the freed blocks back (a real repack)."""
    if bool((keep | ~layer.in_use(keep.shape[1])).all()):
        return
    layer.repack(keep=keep)


def compact_rows(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row values ``[rows, W]`` with each row's kept entries moved to its front, in order, 0 after;
    the same width, no read-back (how ``LayerStore.compact`` moves the slots)."""
    rows, width = values.shape
    keep = keep.to(values.device)
    cum = torch.cumsum(keep.long(), 1)
    want = torch.arange(1, width + 1, device=values.device)[None, :].expand(rows, width).contiguous()
    src = torch.searchsorted(cum, want).clamp(max=max(width - 1, 0))
    filled = torch.arange(width, device=values.device)[None, :] < cum[:, -1:]
    return torch.where(filled, values.gather(1, src), torch.zeros_like(values))


def mark_dead(layer: LayerStore, victim: torch.Tensor, evict: torch.Tensor) -> None:
    """Decode-time eviction of one slot per row, on the device: the logical slot ``victim[row]`` of every
    row where ``evict[row]`` gets position -1 (dead: never read again; compacted away later)."""
    slots = layer.row_base + victim.clamp(min=0)
    layer.positions.index_copy_(0, slots, torch.where(evict, -1, layer.positions[slots]))


def maintain(layer: LayerStore, caps: list[int], every: int,
             per_slot: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Host-side upkeep of a layer held at ``caps`` tokens per row by decode-time eviction, before a step.

    Each step past a row's cap marks one slot dead, so a row of ``n`` slots holds ``n - cap`` dead
    ones (known on the host). Once some row holds ``every`` of them, the layer is compacted in place,
    and so are the method's per-slot values ``per_slot`` (``[rows, W]`` each, in place too: a captured
    CUDA graph keeps reading the same tensors); ``layer.holes`` tells the attention whether dead slots
    must be masked. Returns ``per_slot``.
    """
    per_slot = list(per_slot or [])
    dead = [n - c for n, c in zip(layer.lengths_host, caps, strict=True)]
    if max(dead, default=0) >= every:
        if per_slot:
            _, pos = padded_layer(layer, per_slot[0].shape[1])
            live = pos.reshape(layer.rows, -1) >= 0
            for values in per_slot:
                values.copy_(compact_rows(values, live))
        layer.compact([min(n, c) for n, c in zip(layer.lengths_host, caps, strict=True)])
        dead = [0]
    layer.holes = max(dead, default=0) > 0
    return per_slot


def compact(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row values ``[rows, T]`` compacted like :meth:`LayerStore.repack` compacts the slots (0 padded)."""
    rows, t = values.shape
    device = values.device
    keep = keep.to(device)
    kept = keep.sum(1)
    width = int(kept.max()) if rows else 0
    out = torch.zeros(rows, width, dtype=values.dtype, device=device)
    dst = torch.cumsum(keep.long(), 1) - 1
    r = torch.arange(rows, device=device)[:, None].expand(rows, t)
    out[r[keep], dst[keep]] = values[keep]
    return out


def per_row(values: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B]`` per-sequence values -> ``[rows]``."""
    return values.repeat_interleave(kv_heads, output_size=values.numel() * kv_heads)


def kept_per_sequence(method: Method, context_lengths: torch.Tensor,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Tokens each sequence keeps per (layer, KV head) under ``method``'s budget ``[B]`` (on ``device``,
    the CPU by default)."""
    return torch.tensor([method.tokens_kept(int(n)) for n in context_lengths], dtype=torch.long, device=device)


def compresses(method: Method) -> bool:
    """False when the budget keeps everything (ratio 0 / budget 1): the method is then a no-op."""
    return method.budget_tokens is not None or method.keep_fraction < 1.0


def check_window_fits(window: int, context_lengths: torch.Tensor) -> None:
    """A clear error when an observation window is not shorter than every prompt of the batch."""
    check(bool((context_lengths > window).all()),
          f"window of {window} tokens must be shorter than every prompt "
          f"(shortest: {int(context_lengths.min())} tokens)")


def check_budget(n_keep: torch.Tensor, protected: int, what: str) -> None:
    """A clear error when the tokens that are always kept do not fit in the budget."""
    smallest = int(n_keep.min())
    check(protected <= smallest,
          f"budget of {smallest} tokens per head is smaller than the {protected} tokens that are always kept "
          f"({what}); raise the budget or lower it")


def grow(values: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad per-row values ``[rows, T]`` on the right to ``width`` columns (new tokens start at 0)."""
    return F.pad(values, (0, width - values.shape[1])) if width > values.shape[1] else values


def rows_of(values: list[int], kv_heads: int) -> list[int]:
    """``[B]`` per-sequence host values -> ``[rows]``."""
    return [v for v in values for _ in range(kv_heads)]


def recent_mask(layer: LayerStore, recent: torch.Tensor | int, width: int) -> torch.Tensor:
    """``[rows, width]`` True on the last ``recent`` tokens in use of each row (``recent``: int or ``[rows]``),
    on the layer's device."""
    device = layer.device
    lengths = layer.lengths.to(device)
    if isinstance(recent, torch.Tensor):
        recent = recent.to(device)
    idx = torch.arange(width, device=device)[None, :]
    return (idx >= (lengths - recent)[:, None]) & layer.in_use(width)
