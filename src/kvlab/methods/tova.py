"""``tova``: TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): keep the
tokens the newest query attends to most, its attention averaged over all heads of the layer, so every
KV head of a layer keeps the same tokens. After prefill this is kvpress's ``TOVAPress`` exactly (the
newest token always kept); during decode TOVA holds the cache at that size, evicting the lowest-scored
token at every step as the paper does (``decode_evict``; kvpress compresses only the prompt): the
step marks it dead on the device, and every ``compact_every`` steps the dead slots are compacted away
in place. Memory bound: a row holds at most its kept tokens plus ``compact_every + 1`` slots (rounded
up to whole blocks).
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


def _tova_scores(layer: LayerStore, query: torch.Tensor, q_pos: torch.Tensor, scaling: float,
                 width: int | None = None) -> torch.Tensor:
    """Head-averaged attention of one query per sequence ``[B, H, T]``; the newest slot gets +inf, empty
    and dead slots -inf (``T``: ``width``, default the longest row)."""
    keys, k_pos = S.padded_layer(layer, width)
    probs = S.attention_probs(layer, query, q_pos, scaling, keys, k_pos)  # [B, H, G, 1, T]
    b, h, g, _, t = probs.shape
    scores = probs.reshape(b, h * g, t).mean(1)[:, None, :].expand(b, h, t).clone()
    newest = (layer.lengths.to(scores.device) - 1).view(b, h, 1)
    scores.scatter_(2, newest.clamp(min=0), float("inf"))
    return scores.masked_fill(k_pos < 0, float("-inf"))


@register
@dataclass
class TOVA(Method):
    """Top ``budget`` tokens by the newest query's head-averaged attention, the same for every KV head."""

    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "TOVA: newest query's head-averaged attention; fixed-size cache in decode"

    decode_evict: bool = True
    compact_every: int = S.COMPACT_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.compact_every >= 1, f"compact_every must be >= 1 decode step, got {self.compact_every}")
        self._capacity: torch.Tensor | None = None  # [B] tokens kept per sequence
        self._caps: list[int] = []  # [rows] the same on the host
        self._scaling = 1.0

    def observation_window(self) -> int:
        return 1

    def observes_decode_queries(self) -> bool:
        return self.decode_evict and S.compresses(self)

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
            query, q_pos = S.observed_queries(ctx, i, 1)
            scores = _tova_scores(layer, query, q_pos, ctx.scaling)
            S.evict(layer, S.keep_top(scores.view(layer.rows, -1), S.per_row(self._capacity, layer.kv_heads)))

    def _evicting(self) -> bool:
        return self.decode_evict and self._capacity is not None

    def decode_reserve(self, tokens: int) -> int:
        return min(tokens, self.compact_every + 1) if self._evicting() else tokens

    def plan_step(self, store: KVStore, step: int) -> Hashable:
        if self._evicting():
            for i in store.compressible_layers():
                S.maintain(store.layers[i], self._caps, self.compact_every)
        return None

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        """Past the cap, each row's lowest-scored token dies (device work only: fixed widths, no read-back)."""
        if not self._evicting():
            return
        for i in store.compressible_layers():
            layer = store.layers[i]
            width = layer.max_capacity_tokens
            scores = _tova_scores(layer, ctx.queries[i], ctx.positions[:, None], self._scaling, width)
            scores = scores.view(layer.rows, width)
            live = scores > float("-inf")
            victim = torch.where(live, scores, torch.inf).argmin(1)
            S.mark_dead(layer, victim, live.sum(1) > S.per_row(self._capacity, layer.kv_heads))

    def decode_end(self, store: KVStore) -> None:
        if self._evicting():
            for i in store.compressible_layers():
                S.maintain(store.layers[i], self._caps, 1)

    def graph_safe(self) -> bool:
        return True
