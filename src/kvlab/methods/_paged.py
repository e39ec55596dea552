"""What a paged serving engine can free: whole pages of a prompt, the same count for every KV head of a layer.

vLLM keeps one block table per request and KV-cache group, and a page holds every KV head of a layer, so an
eviction it can free keeps, per layer, ``m`` whole pages of the prompt's full pages for every KV head (each head
its own best tokens, moved into the first ``m`` pages) and leaves the prompt's partial last page in place
(docs/vllm.md). These rules are shared by kvlab's own methods run at page granularity (``kv-compress``'s
``rates="uniform"/"layer"``, a scorer's ``page``) and by :mod:`kvlab.vllm`, so both keep the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.cache.store import KVStore
from kvlab.methods import _scoring as S


def kept_full_pages(n: int, kept_tokens: int, page: int, protected: int, n_sink: int) -> int:
    """Pages of a prompt of ``n`` tokens that each KV head fills with its kept tokens (paged rates).

    The prompt's partial last page ``[F, n)`` (``F = n // page * page``) stays in place, so of the
    ``kept_tokens`` budget ``kept_tokens - (n - F)`` come from the full pages, rounded down to whole pages,
    raised to hold the protected tokens (the last ``protected`` and the first ``n_sink``) that lie in the
    full pages, at most every full page (then nothing is evicted).
    """
    full = n // page
    tail = n - full * page
    in_full = min(full * page, max(0, min(protected, n) - tail) + min(n_sink, full * page))
    m = max(kept_tokens - tail, 0) // page
    return min(max(m, -(-in_full // page)), full)


def keep_per_head(scores: torch.Tensor, pages: int, page: int) -> torch.Tensor:
    """``[H, pages * page]`` positions each KV head keeps of its full-page scores ``[H, F]``, in order."""
    return torch.topk(scores, pages * page, dim=1).indices.sort(dim=1).values


def scorer_pages(scores: list[torch.Tensor], n: int, kept: list[int], page: int, per_layer: bool) -> list[int]:
    """Full pages each layer keeps of a prompt of ``n`` tokens under a scorer (``scores[l]``: ``[H, n]``, the
    tokens it must keep scored ``+inf``; ``kept[l]``: its token budget per KV head): the budget's whole pages
    (:func:`kept_full_pages`), raised to hold every ``+inf`` token of the full pages. One count for every layer
    (the most any layer needs: one block table serves them all) unless ``per_layer`` (one KV-cache group per
    layer: a method whose budgets differ by layer, PyramidKV)."""
    full = n // page
    counts = []
    for s, k in zip(scores, kept, strict=True):
        forced = int(torch.isposinf(s[:, : full * page]).sum(1).max()) if full else 0
        counts.append(min(full, max(kept_full_pages(n, k, page, 0, 0), -(-forced // page))))
    return counts if per_layer else [max(counts, default=0)] * len(counts)


def evict_to_pages(store: KVStore, lengths: list[int], page: int,
                   choose: Callable[[int, int], dict[int, tuple[torch.Tensor, int]]]) -> None:
    """Evict every compressible layer to whole pages. For sequence ``b`` of ``n`` prompt tokens, ``choose(b, n)``
    gives each layer its full-page scores ``[H, F]`` and page count ``m`` (``{}``: the sequence keeps
    everything); each KV head keeps its best ``m * page`` tokens of the full pages and the partial last page,
    then one repack per layer frees the rest."""
    layers, h = store.compressible_layers(), store.kv_heads
    keeps = {i: torch.ones(store.layers[i].rows, store.layers[i].max_length, dtype=torch.bool) for i in layers}
    for b, n in enumerate(lengths):
        for i, (scores, m) in choose(b, n).items():
            keep = keeps[i][b * h:(b + 1) * h]
            keep[:, : n // page * page] = False
            keep.scatter_(1, keep_per_head(scores, m, page), True)
    for i in layers:
        layer = store.layers[i]
        S.evict(layer, keeps[i].to(layer.device) & layer.in_use(keeps[i].shape[1]))
