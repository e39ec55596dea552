"""``knorm``: keep the keys of smallest L2 norm (Devoto et al., 2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430). Same as kvpress's ``KnormPress``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore
from kvlab.methods import _scoring as S
from kvlab.methods.base import Method, PrefillContext, register


@register
@dataclass
class KNorm(Method):
    """Score = minus the key norm (float32 at least); keep the top ``budget`` tokens per KV head."""

    name: ClassVar[str] = "knorm"
    summary: ClassVar[str] = "K-norm: keep the keys of smallest L2 norm, per head"

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        if not S.compresses(self):
            return
        n_keep = S.kept_per_sequence(self, ctx.context_lengths)
        for i in store.compressible_layers():
            layer = store.layers[i]
            keys, pos = S.padded_layer(layer)
            dtype = torch.promote_types(keys.dtype, torch.float32)
            scores = -torch.linalg.vector_norm(keys, dim=-1, dtype=dtype)
            scores = scores.masked_fill(pos < 0, float("-inf"))
            S.evict(layer, S.keep_top(scores.view(layer.rows, -1), S.per_row(n_keep, layer.kv_heads)))
