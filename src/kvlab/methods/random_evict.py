"""``random``: evict uniformly at random (the floor any scoring method must beat; kvpress's
``RandomPress``). Seeded, so runs repeat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore
from kvlab.methods import _scoring as S
from kvlab.methods.base import Method, PrefillContext, register


@register
@dataclass
class RandomEvict(Method):
    """Random scores; keep the top ``budget`` tokens per KV head."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "random eviction (baseline floor), per head"

    seed: int = 0

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        if not S.compresses(self):
            return
        n_keep = S.kept_per_sequence(self, ctx.context_lengths)
        generator = torch.Generator().manual_seed(self.seed)
        for i in store.compressible_layers():
            layer = store.layers[i]
            _, pos = S.padded_layer(layer)
            # drawn on the CPU (the generator's device), so every device draws the same numbers
            scores = torch.rand(pos.shape, generator=generator).to(pos.device).masked_fill(pos < 0, float("-inf"))
            S.evict(layer, S.keep_top(scores.view(layer.rows, -1), S.per_row(n_keep, layer.kv_heads)))
