"""``snapkv``: SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation", arXiv 2404.14469): score every prompt token by the attention the last ``window``
prompt queries give it, smoothed by average pooling, and keep the top ones per KV head (plus the
window). Scoring follows kvpress's ``SnapKVPress`` exactly (checked by tests/test_kvpress_crosscheck.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import PrefillContext, register
from kvlab.methods.scorer import ScorerMethod


@register
@dataclass
class SnapKV(ScorerMethod):
    """Pooled window attention, top ``budget`` tokens per KV head; the observation window is always kept.

    Deliberate difference from kvpress: when the budget is smaller than the window, kvpress keeps an
    arbitrary subset of the window (a top-k among equal scores); kvlab raises a KVLabError instead.
    """

    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "SnapKV: pooled attention of the last window queries, per-head top-k"

    window: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.window >= 1, f"window must be >= 1, got {self.window}")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"kernel_size must be odd, got {self.kernel_size}")

    def observation_window(self) -> int:
        return self.window

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        n_keep = S.kept_per_sequence(self, ctx.context_lengths)
        S.check_window_fits(self.window, ctx.context_lengths)
        S.check_budget(n_keep, self.window, f"the observation window of {self.window}")

    def score(self, layer_idx: int, layer: LayerStore, ctx: PrefillContext) -> torch.Tensor:
        return S.snapkv_scores(layer, ctx, layer_idx, self.window, self.kernel_size)
