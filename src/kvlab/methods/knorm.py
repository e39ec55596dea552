"""``knorm``: keep the keys of smallest L2 norm (Devoto et al., 2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430). Same as kvpress's ``KnormPress``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.probs import padded_layer
from kvlab.cache.store import LayerStore
from kvlab.methods.base import PrefillContext, register
from kvlab.methods.scorer import ScorerMethod


@register
@dataclass
class KNorm(ScorerMethod):
    """Score = minus the key norm; keep the top ``budget`` tokens per KV head."""

    name: ClassVar[str] = "knorm"
    summary: ClassVar[str] = "K-norm: keep the keys of smallest L2 norm, per head"

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        keys, pos = padded_layer(layer)
        # in float32 at least: a bfloat16 norm ties the scores of distinct keys (kvpress does the same)
        scores = -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.promote_types(keys.dtype, torch.float32))
        return scores.masked_fill(pos < 0, float("-inf"))
