"""``random``: evict uniformly at random (the floor any scoring method must beat; kvpress's
``RandomPress``). Seeded, so runs repeat."""

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
class RandomEvict(ScorerMethod):
    """Random scores; keep the top ``budget`` tokens per KV head."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "random eviction (baseline floor), per head"

    seed: int = 0

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        """Uniform scores drawn from ``seed`` and the layer (on the CPU, so every device draws the same numbers):
        a function of its inputs, so a layer scored alone (inside vLLM, one prompt at a time) draws what it
        draws in kvlab's own engine."""
        _, pos = padded_layer(layer)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_idx)
        return torch.rand(pos.shape, generator=generator).to(pos.device).masked_fill(pos < 0, float("-inf"))
