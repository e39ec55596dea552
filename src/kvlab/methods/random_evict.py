"""``random``: evict uniformly at random (the floor any scoring method must beat; kvpress's
``RandomPress``). Seeded, so runs repeat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.probs import padded_layer
from kvlab.cache.store import KVStore, LayerStore
from kvlab.methods.base import PrefillContext, register
from kvlab.methods.scorer import ScorerMethod


@register
@dataclass
class RandomEvict(ScorerMethod):
    """Random scores; keep the top ``budget`` tokens per KV head."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "random eviction (baseline floor), per head"

    seed: int = 0

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)  # one stream over the layers, in order

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        _, pos = padded_layer(layer)
        # drawn on the CPU (the generator's device), so every device draws the same numbers
        return torch.rand(pos.shape, generator=self._generator).to(pos.device).masked_fill(pos < 0, float("-inf"))
