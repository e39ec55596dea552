"""Oracles for selection quality: they compute the true attention of each decode query (a full
attention pass) and read the best part of the cache by it, so they bound what any router can reach.

- ``oracle-tokens``: the top-k tokens by true attention mass (scattered; the ceiling of token
  selection, the selection ClusterKV, arXiv 2412.03213, and Quest, arXiv 2406.10774, approximate);
- ``oracle-blocks``: the top-k blocks of ``block_size`` tokens by true attention mass (the ceiling of
  block selection at that block size).

Under GQA the mass of a group's query heads is summed, so the group reads one selection, as the
routers do. Neither forces sink or local blocks: the bound is the plain top-k. The per-step recall
diagnostic (``record_recall=true`` on any router) uses the same true attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.attention.probs import attention_mass
from kvlab.cache.store import LayerStore, ceil_div
from kvlab.kernels.selection import top_blocks
from kvlab.methods.base import register
from kvlab.methods.routing import RoutePlan, RoutingMethod


@dataclass
class _Oracle(RoutingMethod):
    sink_blocks: int = 0
    local_blocks: int = 1
    dense_layers: int | str | list[int] = 0

    def graph_safe(self) -> bool:
        return False  # the true attention is computed row by row

    def _mass(self, layer: LayerStore, query: torch.Tensor) -> torch.Tensor:
        """``[rows, T]`` true attention mass summed over each GQA group."""
        scaling = getattr(self, "_scaling", None) or query.shape[-1] ** -0.5
        mass = attention_mass(layer, query, scaling)  # [B, H, G, T]
        return mass.sum(2).reshape(layer.rows, -1)


@register
@dataclass
class OracleTokens(_Oracle):
    """Read the budget's top-k tokens per KV head by true attention mass (an accuracy ceiling)."""

    name: ClassVar[str] = "oracle-tokens"
    summary: ClassVar[str] = "oracle: top-k tokens by true attention (costs a full attention pass)"

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, plan: RoutePlan,
               backend: str) -> ReadPlan:
        lengths = layer.lengths
        budgets = torch.minimum(torch.tensor(plan.budgets, device=lengths.device), lengths)
        width = max(min(b, n) for b, n in zip(plan.budgets, plan.lengths, strict=True))
        mass = self._mass(layer, query)
        index = top_blocks(mass, lengths, budgets, width)  # tokens are blocks of one
        return ReadPlan("tokens", index.view(layer.batch, layer.kv_heads, -1), ascending=True)


@register
@dataclass
class OracleBlocks(_Oracle):
    """Read the budget's top-k blocks per KV head by true attention mass (the block-selection ceiling)."""

    name: ClassVar[str] = "oracle-blocks"
    summary: ClassVar[str] = "oracle: top-k blocks by true attention mass (costs a full attention pass)"

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, plan: RoutePlan,
               backend: str) -> ReadPlan:
        lengths = layer.lengths
        bs = self.block_size
        nb, k = self.blocks_read(lengths)
        k = k.clamp(min=1)
        mass = self._mass(layer, query)
        width = ceil_div(layer.max_length, bs)
        mass = torch.nn.functional.pad(mass, (0, width * bs - mass.shape[1]))
        block_mass = mass.view(layer.rows, width, bs).sum(-1)
        most = max(1, max(ceil_div(n, bs) if b >= n else min(b // bs, ceil_div(n, bs))
                          for b, n in zip(plan.budgets, plan.lengths, strict=True)))
        index = top_blocks(block_mass, nb, k, most)
        return ReadPlan("blocks", index.view(layer.batch, layer.kv_heads, -1), block_size=bs, ascending=True)
