"""``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048): keep the tokens with the largest
accumulated attention ("heavy hitters") plus a window of recent tokens, per KV head.

Deliberate difference from the paper: at prefill the attention is accumulated over the last
``window`` prompt queries (at most 64 are observed), not over every prompt query. During decode every
new query's attention is added and the cache is held at its post-prefill size (``decode_evict``):
each step marks each row's lowest-scored token dead, on the device, and every ``compact_every`` steps
the dead slots (and their scores) are compacted away in place. Memory bound: a row holds at most its
kept tokens plus ``compact_every + 1`` slots (rounded up to whole blocks).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import Method, PrefillContext, StepContext, register


@register
@dataclass
class H2O(Method):
    """Accumulated attention (summed over the GQA group) plus ``recent_fraction`` of the budget as a recent window."""

    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "H2O: accumulated attention heavy hitters + recent window, per head"

    window: int = 64
    recent_fraction: float = 0.5
    decode_evict: bool = True
    compact_every: int = S.COMPACT_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.window >= 1, f"window must be >= 1, got {self.window}")
        check(0 <= self.recent_fraction <= 1, f"recent_fraction must be in [0, 1], got {self.recent_fraction}")
        check(self.compact_every >= 1, f"compact_every must be >= 1 decode step, got {self.compact_every}")
        self._acc: dict[int, torch.Tensor] = {}  # layer -> [rows, W] accumulated attention per slot
        self._capacity: torch.Tensor | None = None  # [B] tokens kept per sequence
        self._caps: list[int] = []  # [rows] the same on the host
        self._scaling = 1.0

    def observation_window(self) -> int:
        return self.window

    def observes_decode_queries(self) -> bool:
        return self.decode_evict and S.compresses(self)

    def _recent(self, cap: torch.Tensor) -> torch.Tensor:
        return torch.clamp((cap * self.recent_fraction).long(), min=1)

    def _evict(self, layer: LayerStore, i: int, cap: torch.Tensor) -> None:
        acc = self._acc[i]
        scores = acc.masked_fill(S.recent_mask(layer, self._recent(cap), acc.shape[1]), float("inf"))
        scores = scores.masked_fill(~layer.in_use(acc.shape[1]), float("-inf"))
        keep = S.keep_top(scores, torch.minimum(cap, layer.lengths))
        S.evict(layer, keep)
        self._acc[i] = S.compact(acc, keep)

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self._capacity = None
        if not S.compresses(self):
            return
        # on the device of the row lengths it is compared with at every step
        self._capacity = S.kept_per_sequence(self, ctx.context_lengths, device=store.layers[0].lengths.device)
        self._caps = S.rows_of(self._capacity.tolist(), store.kv_heads)
        self._scaling = ctx.scaling
        for i in store.compressible_layers():
            layer = store.layers[i]
            queries, q_pos = S.observed_queries(ctx, i, self.window)
            probs = S.attention_probs(layer, queries, q_pos, ctx.scaling)
            self._acc[i] = probs.sum(dim=(2, 3)).reshape(layer.rows, -1)
            self._evict(layer, i, S.per_row(self._capacity, layer.kv_heads))

    def decode_reserve(self, tokens: int) -> int:
        return min(tokens, self.compact_every + 1) if self._evicting() else tokens

    def _evicting(self) -> bool:
        return self.decode_evict and self._capacity is not None

    def plan_step(self, store: KVStore, step: int) -> Hashable:
        """Host upkeep before a step: scores sized to the layer's capacity; compaction every few steps."""
        if not self._evicting():
            return None
        for i in store.compressible_layers():
            layer = store.layers[i]
            width = layer.max_capacity_tokens
            acc = self._acc[i]
            if acc.shape[1] != width:  # new tokens start at 0
                acc = S.grow(acc, width)[:, :width].contiguous()
            self._acc[i], = S.maintain(layer, self._caps, self.compact_every, [acc])
        return None

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        """Add the step's attention to the scores; past the cap, mark each row's lowest non-recent token dead
        (device work only: fixed widths, no read-back)."""
        if not self._evicting():
            return
        for i in store.compressible_layers():
            layer = store.layers[i]
            acc = self._acc[i]
            width = acc.shape[1]
            keys, k_pos = S.padded_layer(layer, width)
            probs = S.attention_probs(layer, ctx.queries[i], ctx.positions[:, None], self._scaling, keys, k_pos)
            acc.add_(probs.sum(dim=(2, 3)).reshape(layer.rows, width))
            cap = S.per_row(self._capacity, layer.kv_heads)
            live = k_pos.reshape(layer.rows, width) >= 0
            candidates = live & ~S.recent_mask(layer, self._recent(cap), width)
            victim = torch.where(candidates, acc, torch.inf).argmin(1)
            S.mark_dead(layer, victim, live.sum(1) > cap)

    def decode_end(self, store: KVStore) -> None:
        if self._evicting():
            for i in store.compressible_layers():
                self._acc[i], = S.maintain(store.layers[i], self._caps, 1, [self._acc[i]])

    def graph_safe(self) -> bool:
        return True
