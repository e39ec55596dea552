"""``kv-compress``: KV-Compress (Rehg, 2024, "KV-Compress: Paged KV-Cache Compression with Variable
Compression Rates per Attention Head", arXiv 2410.00161).

- Metric per cached KV: the sum over observed queries of the squared attention it received
  (``aggregation="l2"``; ``"l1"`` sums plain attention), summed over every query head of its GQA group
  (keys are never repeated). Observed queries: the last ``window`` prompt queries (8; the
  ``kv-compress-w32`` preset uses 32) and, with continual compression, every decode query.
  Optionally max-pooled along the sequence (``pool_kernel``, 7; 1 turns it off).
- Protected: the last ``protected`` tokens of every head and the first ``n_sink`` positions.
- Schedule: per sequence, one global sort over all compressible layers and KV heads at block
  granularity. Within a head, evicting its ``j`` lowest-metric blocks' worth of tokens is a candidate
  scored by the metric of the last KV it removes; candidates are sorted together and taken from the
  lowest until enough tokens are gone, so each head loses a whole number of blocks (its last
  candidate may be partial when fewer than a block of unprotected tokens remain) and layers and heads
  end up with different lengths.
- Budget: ``ratio``/``budget`` (the fraction of every sequence's KVs kept overall), ``budget_tokens``
  (tokens per layer and head, on average) or ``max_cache_tokens`` (KVs per sequence over all
  compressible layers and heads).
- The evicted blocks are freed: survivors are compacted into a freshly sized pool (``LayerStore.repack``).
- ``interval=None`` compresses once after prefill; ``interval=n`` compresses again every ``n`` decode
  steps, back to the budget of the grown context, with metrics accumulated from the decode queries.
- ``rates``: ``"head"`` (the paper: every layer and KV head its own length, as above), or the two
  variants a paged serving engine can free (vLLM keeps one block table per request and KV-cache group,
  and a page holds every KV head of a layer, docs/vllm.md): ``"layer"`` (one length per layer, from one
  sort over layers at page granularity) and ``"uniform"`` (one length per sequence). In both each KV head
  still keeps its own best tokens, the prompt's partial last page (``block_size`` tokens per page) stays
  as it is, and the kept count is whole pages (:func:`~kvlab.methods._paged.kept_full_pages`,
  :func:`pages_per_layer`), so
  ``kvlab.vllm`` and this method keep the same tokens. Once after prefill (no ``interval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvlab.attention.probs import attention_probs, padded_layer
from kvlab.cache.store import KVStore, LayerStore, ceil_div
from kvlab.errors import KVLabError, check
from kvlab.methods import _scoring as S
from kvlab.methods._paged import evict_to_pages, kept_full_pages
from kvlab.methods.base import Method, PrefillContext, StepContext, register


@register
@dataclass
class KVCompress(Method):
    """Squared-attention metric, one block-granular global sort per sequence across layers and heads."""

    name: ClassVar[str] = "kv-compress"
    summary: ClassVar[str] = "KV-Compress: global block eviction across layers and heads, variable head lengths"
    family: ClassVar[str] = "eviction"

    window: int = 8
    aggregation: str = "l2"
    pool_kernel: int = 7
    protected: int = 8
    n_sink: int = 0
    interval: int | None = None
    max_cache_tokens: int | None = None
    rates: str = "head"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(1 <= self.window <= 64, f"window must be in [1, 64] observed queries, got {self.window}")
        check(self.aggregation in ("l1", "l2"), f"aggregation must be 'l1' or 'l2', got {self.aggregation!r}")
        check(self.pool_kernel >= 1 and self.pool_kernel % 2 == 1,
              f"pool_kernel must be odd (1 = no pooling), got {self.pool_kernel}")
        check(self.protected >= 0 and self.n_sink >= 0,
              f"protected and n_sink must be >= 0, got {self.protected} and {self.n_sink}")
        check(self.interval is None or self.interval >= 1, f"interval must be >= 1 step, got {self.interval}")
        check(self.max_cache_tokens is None or self.max_cache_tokens > 0,
              f"max_cache_tokens must be positive, got {self.max_cache_tokens}")
        check(self.rates in RATES, f"rates must be one of {', '.join(RATES)}, got {self.rates!r}")
        check(self.rates == "head" or (self.interval is None and self.max_cache_tokens is None),
              f"rates={self.rates!r} compresses once after prefill to a fraction or token budget: "
              "no interval, no max_cache_tokens")
        givens = sum(x is not None for x in (self.budget_tokens, self.max_cache_tokens))
        check(givens <= 1 and not (givens and (self.budget is not None or self.ratio is not None)),
              "give the budget one way: ratio, budget, budget_tokens or max_cache_tokens")
        self._metric: dict[int, torch.Tensor] = {}
        self._context: torch.Tensor | None = None
        self._scaling = 1.0

    # ------------------------------------------------------------ hooks
    def _active(self) -> bool:
        return self.max_cache_tokens is not None or S.compresses(self)

    def observation_window(self) -> int:
        return self.window

    def observes_decode_queries(self) -> bool:
        return self.interval is not None and self._active()

    def graph_safe(self) -> bool:
        return self.interval is None  # continual compression repacks the store every `interval` steps

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        if not self._active():
            return
        self._context = ctx.context_lengths.clone()
        self._scaling = ctx.scaling
        for i in store.compressible_layers():
            queries, q_pos = S.observed_queries(ctx, i, self.window)
            self._metric[i] = self._observe(store.layers[i], queries, q_pos)
        if self.rates != "head":
            self._compress_paged(store)
            return
        self.compress(store, self._context)

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        if self.interval is None or self._context is None:
            return
        for i in store.compressible_layers():
            add = self._observe(store.layers[i], ctx.queries[i], ctx.positions[:, None])
            self._metric[i] = S.grow(self._metric[i], add.shape[1])[:, :add.shape[1]] + add
        if (ctx.step + 1) % self.interval == 0:
            self.compress(store, self._context + ctx.step + 1)

    # ---------------------------------------------------------- scoring
    def _observe(self, layer: LayerStore, queries: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Metric ``[rows, T]`` from ``queries``: attention (squared for L2) summed over queries and group."""
        probs = attention_probs(layer, queries, q_pos, self._scaling)  # [B, H, G, w, T]
        return window_metric(probs, self.aggregation).reshape(layer.rows, -1)

    def _eviction_order(self, layer: LayerStore, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's slots sorted by pooled metric, protected and unused slots last; and the evictable count."""
        t = metric.shape[1]
        in_use = layer.in_use(t)
        m = pool_metric(metric.masked_fill(~in_use, float("-inf")), self.pool_kernel)
        protected = S.recent_mask(layer, self.protected, t)
        if self.n_sink:
            _, pos = padded_layer(layer)
            protected |= (pos.reshape(layer.rows, -1)[:, :t] < self.n_sink) & in_use
        evictable = in_use & ~protected
        m = m.masked_fill(~evictable, float("inf"))
        order = torch.sort(m, dim=1, stable=True)
        return order, evictable.sum(1)

    # --------------------------------------------------------- schedule
    def _allowed(self, store: KVStore, full_lengths: torch.Tensor) -> torch.Tensor:
        """KVs each sequence may keep over all compressible layers and heads ``[B]``."""
        heads = len(store.compressible_layers()) * store.kv_heads
        if self.max_cache_tokens is not None:
            return torch.full_like(full_lengths, self.max_cache_tokens)
        if self.budget_tokens is not None:
            return torch.full_like(full_lengths, self.budget_tokens * heads)
        return torch.tensor([int(self.keep_fraction * int(n) * heads) for n in full_lengths], dtype=torch.long,
                            device=full_lengths.device)

    def compress(self, store: KVStore, full_lengths: torch.Tensor) -> None:
        """Evict whole blocks, lowest candidate first, until every sequence is within its budget."""
        layers = store.compressible_layers()
        if not layers:
            return
        b, h, bs = store.batch, store.kv_heads, store.block_size
        device = store.layers[layers[0]].device  # the data's; full_lengths and row lengths may be elsewhere
        allowed = self._allowed(store, full_lengths).to(device)
        orders, scores, tokens = {}, [], []
        for i in layers:
            layer = store.layers[i]
            order, n_evictable = self._eviction_order(layer, self._metric[i])
            orders[i] = (order, n_evictable)
            t = order.values.shape[1]
            j = torch.arange(1, ceil_div(t, bs) + 1, device=device)  # candidate j evicts the j*bs lowest (capped)
            last = torch.minimum(j[None, :] * bs, n_evictable[:, None])  # [rows, J]
            valid = (j[None, :] - 1) * bs < n_evictable[:, None]
            score = order.values.gather(1, (last - 1).clamp(min=0).clamp(max=max(t - 1, 0)))
            scores.append(torch.where(valid, score, torch.full_like(score, float("inf"))).view(b, -1))
            tokens.append(torch.where(valid, last - (j[None, :] - 1) * bs, torch.zeros_like(last)).view(b, -1))
        held = sum(store.layers[i].lengths.view(b, h).sum(1) for i in layers).to(device)
        need = (held - allowed).clamp(min=0)  # [B]
        scores_all, tokens_all = torch.cat(scores, 1), torch.cat(tokens, 1)
        evictable_all = tokens_all.sum(1)
        if bool((need > evictable_all).any()):
            worst = int(torch.argmax(need - evictable_all))
            raise KVLabError(
                f"kv-compress: the budget of {int(allowed[worst])} KVs for sequence {worst} is smaller than its "
                f"{int(held[worst] - evictable_all[worst])} protected KVs (protected={self.protected}, "
                f"n_sink={self.n_sink} per head over {len(layers)} layers x {h} heads); raise the budget")
        sorted_scores, perm = torch.sort(scores_all, dim=1, stable=True)
        cum = torch.cumsum(tokens_all.gather(1, perm), 1)
        chosen_sorted = (cum - tokens_all.gather(1, perm)) < need[:, None]
        chosen = torch.zeros_like(chosen_sorted).scatter_(1, perm, chosen_sorted)
        start = 0
        for n, i in enumerate(layers):
            layer = store.layers[i]
            width = scores[n].shape[1]
            picked = chosen[:, start:start + width].reshape(layer.rows, -1).sum(1)  # candidates per row
            start += width
            order, n_evictable = orders[i]
            drop_count = torch.minimum(picked * bs, n_evictable)
            if not bool(drop_count.any()):
                continue
            t = order.values.shape[1]
            idx = torch.arange(t, device=device)[None, :]
            drop_sorted = idx < drop_count[:, None]
            keep = torch.ones(layer.rows, t, dtype=torch.bool, device=device).scatter_(1, order.indices, ~drop_sorted)
            keep &= layer.in_use(t)
            S.evict(layer, keep)
            self._metric[i] = S.compact(self._metric[i], keep)


    # ------------------------------------------- paged rates (vLLM's constraint)
    def _compress_paged(self, store: KVStore) -> None:
        """``rates="layer"``/``"uniform"``: whole pages per layer (or sequence), each head its own tokens."""
        layers, h, page = store.compressible_layers(), store.kv_heads, store.block_size

        def choose(b: int, n: int) -> dict[int, tuple[torch.Tensor, int]]:
            uniform = kept_full_pages(n, self.tokens_kept(n), page, self.protected, self.n_sink)
            if uniform >= n // page:
                return {}  # the budget keeps every full page
            scores = {}
            for i in layers:
                layer = store.layers[i]
                _, pos = padded_layer(layer)
                pos = pos.reshape(layer.rows, -1)[b * h:(b + 1) * h]
                metric = self._metric[i][b * h:(b + 1) * h]
                metric = pool_metric(metric.masked_fill(pos < 0, float("-inf")), self.pool_kernel)
                # slot t holds position t after prefill; score the full pages, protected tokens forced
                scores[i] = paged_scores(metric[:, : n // page * page].cpu(), n, self.protected, self.n_sink)
            counts = {i: uniform for i in layers}
            if self.rates == "layer":
                floor = kept_full_pages(n, 1, page, self.protected, self.n_sink)
                counts = dict(zip(layers, pages_per_layer([scores[i] for i in layers], uniform, floor, page),
                                  strict=True))
            return {i: (scores[i], counts[i]) for i in layers}

        evict_to_pages(store, [int(x) for x in self._context.tolist()], page, choose)


RATES = ("head", "layer", "uniform")


def window_metric(probs: torch.Tensor, aggregation: str) -> torch.Tensor:
    """KV-Compress's metric from attention probabilities ``[..., G, w, T]``: the attention each key received
    (squared for ``"l2"``), summed over the observed queries and the query heads of its GQA group: ``[..., T]``."""
    if aggregation == "l2":
        probs = probs.square()
    return probs.sum(dim=(-3, -2))


def pool_metric(metric: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool a metric ``[rows, T]`` along the sequence (``kernel`` odd; 1: unchanged; ``-inf`` pads)."""
    if kernel <= 1:
        return metric
    return F.max_pool1d(metric[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0]


def paged_scores(metric: torch.Tensor, n: int, protected: int, n_sink: int) -> torch.Tensor:
    """A pooled metric ``[H, F]`` over the full pages of a prompt of ``n`` tokens, ``+inf`` on protected tokens."""
    pos = torch.arange(metric.shape[1], device=metric.device)
    forced = (pos >= n - protected) | (pos < n_sink)
    return metric.masked_fill(forced[None, :], float("inf"))


def pages_per_layer(scores: list[torch.Tensor], uniform: int, floor: int, page: int) -> list[int]:
    """Full pages each layer keeps (``rates="layer"``): one sort over layers, KV-Compress's global sort at
    page granularity with one count per layer, the same total as ``uniform`` pages in every layer.

    ``scores[l]``: :func:`paged_scores` ``[H, F]`` of layer ``l``. Every layer starts at ``floor`` pages (its
    protected tokens); the other ``L * (uniform - floor)`` pages go to the highest candidates, where a
    layer's ``k``-th page scores the metric of the best token it would add (the ``k * page``-th best of
    its heads, max over heads, so a layer's candidates only fall); ties go to the earlier layer and page.
    """
    if not scores:
        return []
    full = scores[0].shape[1] // page
    if uniform >= full:
        return [full] * len(scores)
    ranks = torch.arange(floor, full) * page
    cand = torch.stack([s.sort(dim=1, descending=True).values[:, ranks].amax(0) for s in scores])  # [L, full - floor]
    order = torch.sort(-cand.flatten(), stable=True).indices[: len(scores) * (uniform - floor)]
    return (floor + torch.bincount(order // (full - floor), minlength=len(scores))).tolist()


@register
@dataclass
class KVCompressW32(KVCompress):
    """The paper's second preset: 32 observed prompt queries."""

    name: ClassVar[str] = "kv-compress-w32"
    summary: ClassVar[str] = "KV-Compress with 32 observed queries"

    window: int = 32
