"""``ada-snapkv``: SnapKV scores with AdaKV's head-adaptive budgets (Feng et al., 2024, "Ada-KV:
Optimizing KV Cache Eviction by Adaptive Budget Allocation", arXiv 2407.11550): one top-k across all
KV heads of a layer (per sequence), after each head is guaranteed ``safeguard`` of its share.

kvpress's ``AdaKVPress`` only masks the evicted entries (every head keeps its full length in memory);
kvlab evicts them for real, so heads end up with different lengths and the memory is given back.
The kept set is the complement of AdaKVPress's masked set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import PrefillContext, register
from kvlab.methods.snapkv import SnapKV


@register
@dataclass
class AdaSnapKV(SnapKV):
    """Per layer and sequence, keep ``heads * budget`` tokens chosen across heads; each head keeps at least
    ``safeguard * budget`` (its top tokens) and its observation window."""

    name: ClassVar[str] = "ada-snapkv"
    summary: ClassVar[str] = "AdaKV + SnapKV: head-adaptive budgets, real per-head lengths"
    per_head_budgets: ClassVar[bool] = True

    safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.safeguard <= 1, f"safeguard must be in [0, 1], got {self.safeguard}")

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        S.check_window_fits(self.window, ctx.context_lengths)
        S.check_budget(S.kept_per_sequence(self, ctx.context_lengths), self.window,
                       f"the observation window of {self.window}")

    def keep(self, layer_idx: int, layer: LayerStore, scores: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
        """Each head's safeguard share first (its top tokens, scored +inf), then one top-k across the heads."""
        b, h, t = scores.shape
        n_safe = torch.tensor([int(int(n) * self.safeguard) for n in n_keep], dtype=torch.long)
        if self.safeguard > 0:
            n_safe = n_safe.clamp(min=1)
        safe = S.keep_top(scores.view(b * h, t), S.per_row(n_safe, h)).view(b, h, t)
        scores = scores.masked_fill(safe, float("inf"))
        return S.keep_top(scores.view(b, h * t), n_keep * h).view(b * h, t)
