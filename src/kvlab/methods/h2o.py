"""``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048): keep the tokens with the largest
accumulated attention ("heavy hitters") plus a window of recent tokens, per KV head.

Deliberate difference from the paper: at prefill the attention is accumulated over the last
``window`` prompt queries (at most 64 are observed), not over every prompt query. During decode every
new query's attention is added and the cache is held at its post-prefill size (``decode_evict``):
each step marks each row's lowest-scored token dead, on the device, and every ``compact_every`` steps
the dead slots (and their scores) are compacted away in place (:class:`~kvlab.methods.scorer.HeldScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.probs import attention_probs, padded_layer
from kvlab.cache.store import LayerStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import PrefillContext, StepContext, register
from kvlab.methods.scorer import HeldScorer


@register
@dataclass
class H2O(HeldScorer):
    """Accumulated attention (summed over the GQA group) plus ``recent_fraction`` of the budget as a recent window."""

    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "H2O: accumulated attention heavy hitters + recent window, per head"

    window: int = 64
    recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.window >= 1, f"window must be >= 1, got {self.window}")
        check(0 <= self.recent_fraction <= 1, f"recent_fraction must be in [0, 1], got {self.recent_fraction}")
        self._acc: dict[int, torch.Tensor] = {}  # layer -> [rows, W] accumulated attention per slot

    def observation_window(self) -> int:
        return self.window

    def _recent(self, cap: torch.Tensor) -> torch.Tensor:
        return torch.clamp((cap * self.recent_fraction).long(), min=1)

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        """The window's attention summed per slot (kept for decode); the recent window scores +inf."""
        queries, q_pos = S.observed_queries(ctx, layer_idx, self.window)
        acc = attention_probs(layer, queries, q_pos, ctx.scaling).sum(dim=(2, 3)).reshape(layer.rows, -1)
        self._acc[layer_idx] = acc
        recent = S.recent_mask(layer, self._recent(self._row_caps), acc.shape[1])
        return acc.masked_fill(recent, float("inf")).masked_fill(~layer.in_use(acc.shape[1]), float("-inf"))

    def keep(self, layer_idx: int, layer: LayerStore, scores: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
        keep = S.keep_top(scores, torch.minimum(S.per_row(n_keep, layer.kv_heads), layer.lengths))
        self._acc[layer_idx] = S.compact(self._acc[layer_idx], keep)  # the scores follow their slots
        return keep

    def per_slot(self, layer_idx: int, layer: LayerStore) -> list[torch.Tensor]:
        """The accumulated scores, sized to the layer's capacity (new tokens start at 0)."""
        acc, width = self._acc[layer_idx], layer.max_capacity_tokens
        if acc.shape[1] != width:
            self._acc[layer_idx] = acc = S.grow(acc, width)[:, :width].contiguous()
        return [acc]

    def victims(self, layer_idx: int, layer: LayerStore, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the step's attention to the scores; each row's lowest non-recent token (device work only)."""
        acc = self._acc[layer_idx]
        width = acc.shape[1]
        keys, k_pos = padded_layer(layer, width)
        probs = attention_probs(layer, ctx.queries[layer_idx], ctx.positions[:, None], self._scaling, keys, k_pos)
        acc.add_(probs.sum(dim=(2, 3)).reshape(layer.rows, width))
        live = k_pos.reshape(layer.rows, width) >= 0
        return self.lowest(acc, live & ~S.recent_mask(layer, self._recent(self._row_caps), width), live)
