"""The frame of the scoring evictors (as kvpress's ``ScorerPress.compress``): after prefill, score every
stored token of each compressible layer and keep each row's highest; a subclass implements only
:meth:`ScorerMethod.score`.

:class:`HeldScorer` adds decode-time eviction that holds every row at its post-prefill size (TOVA, H2O):
each step's :meth:`~kvlab.methods.base.Method.step_end` marks the row's victim dead on the device, and the
host compacts the dead slots away every ``compact_every`` steps (:func:`kvlab.methods._scoring.maintain`).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import Method, PrefillContext


@dataclass
class ScorerMethod(Method):
    """Evict at prefill end by a score per token: each row keeps its ``kept`` highest-scored tokens."""

    family: ClassVar[str] = "eviction"

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        """Importance of every slot of ``layer``: ``[B, H_kv, T]`` or ``[rows, T]`` (``T``: the longest row),
        ``-inf`` on empty slots. The highest are kept."""
        raise NotImplementedError

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        """Once per prefill, before the first layer is scored: the checks, and what every layer shares."""

    def kept(self, layer_idx: int, num_layers: int, ctx: PrefillContext) -> torch.Tensor:
        """Tokens each sequence keeps per KV head in layer ``layer_idx`` ``[B]``. Default: the budget."""
        return S.kept_per_sequence(self, ctx.context_lengths)

    def keep(self, layer_idx: int, layer: LayerStore, scores: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
        """Keep mask ``[rows, T]`` from the scores. Default: the top ``n_keep`` of each row."""
        return S.keep_top(scores.reshape(layer.rows, -1), S.per_row(n_keep, layer.kv_heads))

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        if not S.compresses(self):
            return
        self.prepare(store, ctx)
        for i in store.compressible_layers():
            layer = store.layers[i]
            n_keep = self.kept(i, store.num_layers, ctx)
            S.evict(layer, self.keep(i, layer, self.score(i, layer, ctx), n_keep))


@dataclass
class HeldScorer(ScorerMethod):
    """A scorer that keeps evicting during decode (``decode_evict``), one token per row and step past the
    row's post-prefill size; ``compact_every`` decode steps between in-place compactions.

    Memory bound: a row holds at most its kept tokens plus ``compact_every + 1`` slots (rounded up to whole
    blocks). A subclass implements :meth:`~kvlab.methods.base.Method.step_end` (device work only).
    """

    decode_evict: bool = True
    compact_every: int = S.COMPACT_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.compact_every >= 1, f"compact_every must be >= 1 decode step, got {self.compact_every}")
        self._capacity: torch.Tensor | None = None  # [B] tokens kept per sequence
        self._caps: list[int] = []  # [rows] the same on the host
        self._scaling = 1.0

    def observes_decode_queries(self) -> bool:
        return self.decode_evict and S.compresses(self)

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self._capacity = None
        super().prefill_end(store, ctx)

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        # on the device of the row lengths it is compared with at every step
        self._capacity = S.kept_per_sequence(self, ctx.context_lengths, device=store.layers[0].lengths.device)
        self._caps = S.rows_of(self._capacity.tolist(), store.kv_heads)
        self._scaling = ctx.scaling

    def kept(self, layer_idx: int, num_layers: int, ctx: PrefillContext) -> torch.Tensor:
        return self._capacity

    def evicting(self) -> bool:
        """Whether this decode evicts (``decode_evict``, and the prefill compressed)."""
        return self.decode_evict and self._capacity is not None

    def per_slot(self, layer_idx: int, layer: LayerStore) -> list[torch.Tensor]:
        """The method's per-slot values of a layer (``[rows, W]`` each) that compaction moves with the slots,
        sized for the step about to run. Default: none."""
        return []

    def decode_reserve(self, tokens: int) -> int:
        return min(tokens, self.compact_every + 1) if self.evicting() else tokens

    def plan_step(self, store: KVStore, step: int) -> Hashable:
        """Host upkeep before a step: compaction every ``compact_every`` steps."""
        if self.evicting():
            for i in store.compressible_layers():
                S.maintain(store.layers[i], self._caps, self.compact_every, self.per_slot(i, store.layers[i]))
        return None

    def decode_end(self, store: KVStore) -> None:
        if self.evicting():
            for i in store.compressible_layers():
                S.maintain(store.layers[i], self._caps, 1, self.per_slot(i, store.layers[i]))

    def graph_safe(self) -> bool:
        return True
