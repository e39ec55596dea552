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
from kvlab.cache.store import LayerStore, ceil_div_tensor
from kvlab.methods._routing_common import RoutingMethod, attention_mass, top_blocks
from kvlab.methods.base import register


@dataclass
class _Oracle(RoutingMethod):
    sink_blocks: int = 0
    local_blocks: int = 1
    dense_layers: int | str | list[int] = 0

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

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: int,
               budgets: torch.Tensor) -> ReadPlan:
        lengths = layer.lengths
        budgets = torch.minimum(budgets, lengths)
        mass = self._mass(layer, query)
        index = top_blocks(mass, lengths, budgets, None)  # tokens are blocks of one
        return ReadPlan("tokens", index.view(layer.batch, layer.kv_heads, -1))


@register
@dataclass
class OracleBlocks(_Oracle):
    """Read the budget's top-k blocks per KV head by true attention mass (the block-selection ceiling)."""

    name: ClassVar[str] = "oracle-blocks"
    summary: ClassVar[str] = "oracle: top-k blocks by true attention mass (costs a full attention pass)"

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: int,
               budgets: torch.Tensor) -> ReadPlan:
        lengths = layer.lengths
        bs = self.block_size
        nb = ceil_div_tensor(lengths, bs)
        k = torch.where(budgets >= lengths, nb, torch.minimum(budgets // bs, nb)).clamp(min=1)
        mass = self._mass(layer, query)
        width = int(nb.max())
        mass = torch.nn.functional.pad(mass, (0, width * bs - mass.shape[1]))
        block_mass = mass.view(layer.rows, width, bs).sum(-1)
        index = top_blocks(block_mass, nb, k, None)
        return ReadPlan("blocks", index.view(layer.batch, layer.kv_heads, -1), block_size=bs)
