"""``tova``: TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): keep the
tokens the newest query attends to most, its attention averaged over all heads of the layer, so every
KV head of a layer keeps the same tokens. After prefill this is kvpress's ``TOVAPress`` exactly (the
newest token always kept); during decode TOVA holds the cache at that size, evicting the lowest-scored
token at every step as the paper does (``decode_evict``; kvpress compresses only the prompt): the
step marks it dead on the device, and every ``compact_every`` steps the dead slots are compacted away
in place (:class:`~kvlab.methods.scorer.HeldScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.probs import attention_probs, padded_layer
from kvlab.cache.store import LayerStore
from kvlab.methods import _scoring as S
from kvlab.methods.base import PrefillContext, StepContext, register
from kvlab.methods.scorer import HeldScorer


def _tova_scores(layer: LayerStore, query: torch.Tensor, q_pos: torch.Tensor, scaling: float,
                 width: int | None = None) -> torch.Tensor:
    """Head-averaged attention of one query per sequence ``[B, H, T]``; the newest slot gets +inf, empty
    and dead slots -inf (``T``: ``width``, default the longest row)."""
    keys, k_pos = padded_layer(layer, width)
    probs = attention_probs(layer, query, q_pos, scaling, keys, k_pos)  # [B, H, G, 1, T]
    b, h, g, _, t = probs.shape
    scores = probs.reshape(b, h * g, t).mean(1)[:, None, :].expand(b, h, t).clone()
    newest = (layer.lengths.to(scores.device) - 1).view(b, h, 1)
    scores.scatter_(2, newest.clamp(min=0), float("inf"))
    return scores.masked_fill(k_pos < 0, float("-inf"))


@register
@dataclass
class TOVA(HeldScorer):
    """Top ``budget`` tokens by the newest query's head-averaged attention, the same for every KV head."""

    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "TOVA: newest query's head-averaged attention; fixed-size cache in decode"
    mixes_kv_heads: ClassVar[bool] = True

    def observation_window(self) -> int:
        return 1

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        query, q_pos = S.observed_queries(ctx, layer_idx, 1)
        return _tova_scores(layer, query, q_pos, ctx.scaling)

    def victims(self, layer_idx: int, layer: LayerStore, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's lowest-scored token by the step's query (device work only: fixed widths, no read-back)."""
        width = layer.max_capacity_tokens
        scores = _tova_scores(layer, ctx.queries[layer_idx], ctx.positions[:, None], self._scaling, width)
        scores = scores.view(layer.rows, width)
        live = scores > float("-inf")
        return self.lowest(scores, live, live)
