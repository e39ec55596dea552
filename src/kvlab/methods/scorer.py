"""The frames of the evictors.

:class:`ScorerMethod` (as kvpress's ``ScorerPress.compress``): after prefill, score every stored token of
each compressible layer and keep each row's highest; a subclass implements only :meth:`ScorerMethod.score`.

:class:`HeldCache`: decode-time eviction that holds every row at a fixed size (StreamingLLM, and through
:class:`HeldScorer` TOVA and H2O): past its cap, each step's :meth:`~kvlab.methods.base.Method.step_end`
marks one victim per row dead on the device (a subclass implements only :meth:`HeldCache.victims`), and
the host compacts the dead slots away every ``compact_every`` steps (:func:`kvlab.methods._scoring.maintain`)
in :meth:`~kvlab.methods.base.Method.plan_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods._paged import evict_to_pages, scorer_pages
from kvlab.methods.base import Method, PrefillContext, StepContext, StepPlan


@dataclass
class ScorerMethod(Method):
    """Evict at prefill end by a score per token: each row keeps its ``kept`` highest-scored tokens.

    ``page``: keep whole pages of ``page`` tokens instead, as a paged engine frees them (vLLM: every KV head of a
    layer keeps the same number of the prompt's full pages, each head its own best tokens, the partial last
    page in place; :func:`kvlab.methods._paged.scorer_pages`): what ``kvlab serve`` runs, here in kvlab's engine.
    """

    family: ClassVar[str] = "eviction"
    layer_budgets: ClassVar[bool] = False  # True where ``kept`` differs by layer (then pages differ by layer)
    per_head_budgets: ClassVar[bool] = False  # True where ``keep`` gives the heads of a layer different counts

    page: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.page is None or (isinstance(self.page, int) and self.page >= 1),
              f"page must be a positive token count, got {self.page}")
        check(self.page is None or not self.per_head_budgets,
              f"{self.name}'s per-head budgets cannot be kept in whole pages: a page holds every KV head of a layer, "
              "so every head keeps the same count; use snapkv with page")

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
        if self.page is not None:
            self._evict_pages(store, ctx)
            return
        for i in store.compressible_layers():
            layer = store.layers[i]
            n_keep = self.kept(i, store.num_layers, ctx)
            S.evict(layer, self.keep(i, layer, self.score(i, layer, ctx), n_keep))

    def _evict_pages(self, store: KVStore, ctx: PrefillContext) -> None:
        """``page``: per sequence, every layer's scores first, then whole pages per layer and KV head."""
        layers, h, page = store.compressible_layers(), store.kv_heads, self.page
        scores = {i: self.score(i, store.layers[i], ctx).reshape(store.layers[i].rows, -1).cpu() for i in layers}
        kept = {i: self.kept(i, store.num_layers, ctx).tolist() for i in layers}

        def choose(b: int, n: int) -> dict[int, tuple[torch.Tensor, int]]:
            rows = slice(b * h, (b + 1) * h)
            counts = scorer_pages([scores[i][rows, :n] for i in layers], n, [int(kept[i][b]) for i in layers], page,
                                  self.layer_budgets)
            return {i: (scores[i][rows, : n // page * page], m) for i, m in zip(layers, counts, strict=True)}

        evict_to_pages(store, [int(x) for x in ctx.context_lengths.tolist()], page, choose)


@dataclass
class HeldCache(Method):
    """Decode-time eviction that holds each row at its cap (set by :meth:`hold` at prefill end): one victim per
    row and step past the cap, ``compact_every`` decode steps between in-place compactions.

    Memory bound: a row holds at most its cap plus ``compact_every + 1`` slots (rounded up to whole blocks).
    A subclass implements :meth:`victims` (device work only).
    """

    compact_every: int = S.COMPACT_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.compact_every >= 1, f"compact_every must be >= 1 decode step, got {self.compact_every}")
        self._capacity: torch.Tensor | None = None  # [B] tokens kept per sequence, on the device (None: no hold)
        self._caps: list[int] = []  # [rows] the cap of each row, on the host
        self._row_caps = torch.empty(0, dtype=torch.long)  # the same on the device

    def hold(self, store: KVStore, per_sequence: list[int]) -> None:
        """Hold every row of a sequence at its count of ``per_sequence`` during decode."""
        device = store.layers[0].lengths.device
        self._capacity = torch.tensor(per_sequence, dtype=torch.long, device=device)
        self._caps = S.rows_of(per_sequence, store.kv_heads)
        self._row_caps = torch.tensor(self._caps, dtype=torch.long, device=device)

    def evicting(self) -> bool:
        """Whether this decode evicts (a cap was set at prefill end)."""
        return self._capacity is not None

    def victims(self, layer_idx: int, layer: LayerStore, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot [rows], evict [rows] bool)``: each row's victim after a step, and whether it dies."""
        raise NotImplementedError

    def per_slot(self, layer_idx: int, layer: LayerStore) -> list[torch.Tensor]:
        """The method's per-slot values of a layer (``[rows, W]`` each) that compaction moves with the slots,
        sized for the step about to run. Default: none."""
        return []

    def decode_reserve(self, tokens: int) -> int:
        return min(tokens, self.compact_every + 1) if self.evicting() else tokens

    def plan_step(self, store: KVStore, step: StepPlan) -> StepPlan:
        """Host upkeep before a step: compaction every ``compact_every`` steps."""
        self._maintain(store, self.compact_every)
        return step

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        if self.evicting():
            for i in store.compressible_layers():
                S.mark_dead(store.layers[i], *self.victims(i, store.layers[i], ctx))

    def decode_end(self, store: KVStore) -> None:
        self._maintain(store, 1)

    def _maintain(self, store: KVStore, every: int) -> None:
        if self.evicting():
            for i in store.compressible_layers():
                self.maintain_layer(i, store.layers[i], every)

    def maintain_layer(self, layer_idx: int, layer: LayerStore, every: int | None = None) -> bool:
        """Before a decode step: compact layer ``layer_idx`` in place once a row holds ``every`` dead slots
        (default ``compact_every``), its per-slot values with it. Whether it compacted."""
        every = self.compact_every if every is None else every
        dead = max((n - c for n, c in zip(layer.lengths_host, self._caps, strict=True)), default=0)
        S.maintain(layer, self._caps, every, self.per_slot(layer_idx, layer))
        return dead >= every

    def graph_safe(self) -> bool:
        return True


@dataclass
class HeldScorer(ScorerMethod, HeldCache):
    """A scorer that keeps evicting during decode (``decode_evict``), holding each row at its post-prefill
    size: :class:`HeldCache` with the cap of :class:`ScorerMethod`'s prefill."""

    decode_evict: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.page is None or not self.decode_evict,
              "page keeps whole pages once, at prefill end (as inside vLLM): give decode_evict=false with it")
        self._scaling = 1.0

    def observes_decode_queries(self) -> bool:
        return self.decode_evict and S.compresses(self)

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self._capacity = None
        super().prefill_end(store, ctx)
        if not self.decode_evict:
            self._capacity = None

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        self.hold_at(store, S.kept_per_sequence(self, ctx.context_lengths).tolist(), ctx.scaling)

    def hold_at(self, store: KVStore, caps: list[int], scaling: float) -> None:
        """Hold each sequence at its count of ``caps`` while decoding, attention scaled by ``scaling`` (a server
        holds a prompt shorter than ``budget_tokens`` at ``budget_tokens``: it grows to it first)."""
        self.hold(store, caps)
        self._scaling = scaling

    def kept(self, layer_idx: int, num_layers: int, ctx: PrefillContext) -> torch.Tensor:
        return self._capacity

    def lowest(self, scores: torch.Tensor, candidates: torch.Tensor,
               live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The victims of a scorer: each row's lowest-scored candidate, evicted while the row holds more live
        tokens than its cap (``scores``/``candidates``/``live``: ``[rows, W]``)."""
        victim = torch.where(candidates, scores, torch.inf).argmin(1)
        return victim, live.sum(1) > self._row_caps


def prompt_store(layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None,
                 scaling: float) -> tuple[KVStore, PrefillContext]:
    """One prompt whose post-RoPE keys and values ``[n, H, D]`` (positions 0 .. n-1) and last observed queries
    ``[w, Hq, D]`` live outside kvlab's store (a paged engine's: kvlab.vllm), as a one-layer store and the
    prefill context of layer ``layer_idx``: a scorer's own code runs on them as in kvlab's engine."""
    n, heads, dim = keys.shape
    store = KVStore.empty(1, 1, heads, dim, block_size=16, dtype=keys.dtype, device=keys.device)
    store.layers[0].append(keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                           torch.arange(n, device=keys.device)[None])
    observed = {} if queries is None else {layer_idx: queries.transpose(0, 1)[None]}
    ctx = PrefillContext(context_lengths=torch.tensor([n]), queries=observed, scaling=scaling,
                         num_query_heads=heads if queries is None else queries.shape[1])
    return store, ctx


def score_prompt(method: ScorerMethod, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                 queries: torch.Tensor | None, scaling: float, prepare: bool = False) -> torch.Tensor:
    """``method``'s own scores ``[H, n]`` of one prompt outside kvlab's store (:func:`prompt_store`); ``prepare``:
    run the method's once-per-prefill :meth:`ScorerMethod.prepare` first (the prompt's first layer)."""
    n, heads, _ = keys.shape
    store, ctx = prompt_store(layer_idx, keys, values, queries, scaling)
    layer = store.layers[0]
    if prepare:
        method.prepare(store, ctx)
    return method.score(layer_idx, layer, ctx).reshape(heads, -1)[:, :n]

