"""``pyramidkv``: PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling", arXiv 2406.02069): SnapKV scores, with per-layer budgets that shrink
linearly with depth and average to the overall budget. The budget formula is kvpress's
``PyramidKVPress.get_layer_budget`` (after the KVCache-Factory reference code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import PrefillContext, register
from kvlab.methods.snapkv import SnapKV


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV per layer, budget ``max_num - layer * (max_num - min_num) / (layers - 1)``; ``beta`` sets the slope."""

    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "PyramidKV: SnapKV scores, layer budgets shrinking with depth"
    layer_budgets: ClassVar[bool] = True

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta >= 1, f"beta must be >= 1, got {self.beta}")

    def layer_budget(self, layer_idx: int, num_layers: int, context_length: int) -> int:
        """Tokens per KV head kept in ``layer_idx`` for a prompt of ``context_length`` tokens."""
        q_len, w = context_length, self.window
        kept = self.budget_tokens if self.budget_tokens is not None else q_len * self.keep_fraction
        max_capacity = w + kept
        min_num = (max_capacity - w) / self.beta
        max_num = (max_capacity - w) * 2 - min_num
        if max_num >= q_len - w:
            max_num = q_len - w
            min_num = (max_capacity - w) * 2 - max_num
        if not (q_len >= max_num >= min_num >= w):
            return max(1, round(kept))  # too short for a pyramid: SnapKV's budget
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(max_num - layer_idx * steps)

    def prepare(self, store: KVStore, ctx: PrefillContext) -> None:
        S.check_window_fits(self.window, ctx.context_lengths)

    def kept(self, layer_idx: int, num_layers: int, ctx: PrefillContext) -> torch.Tensor:
        n_keep = torch.tensor([self.layer_budget(layer_idx, num_layers, int(n)) for n in ctx.context_lengths])
        S.check_budget(n_keep, self.window, f"the observation window of {self.window}, layer {layer_idx}")
        return n_keep
