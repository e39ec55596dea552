"""``block-route``: position-aware, block-contiguous decode-time routing (kvlab's core method).

The whole cache is kept. Each (layer, KV head) row is cut into contiguous blocks of ``block_size``
tokens; every decode step scores the blocks against the query and reads the best ones, each block
(and each run of consecutive blocks) as one contiguous slice. Scoring follows:

- ``score="centroid"``: q · mean key of the block -- MoBA (Lu et al., 2025, arXiv 2502.13189) gates
  blocks by the mean-pooled key, ShadowKV (Sun et al., 2024, arXiv 2410.21465) uses chunk landmarks;
- ``score="bound"``: Σ_i max(q_i·min_i, q_i·max_i), Quest's upper bound on q · k over the block
  (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
  arXiv 2406.10774), computed as q⁺·max + q⁻·min.

``score_block`` scores at a finer granularity than blocks are read (a block's score is the max of its
sub-blocks' scores), as LServe scores 16-token logical pages inside 64-token physical pages (Yang et
al., 2025, arXiv 2502.14866). Under GQA the scores of a group's query heads are summed, so the whole
group reads one selection.

A step does no host work per layer: the budgets and the read width come from the step's host plan
(:class:`~kvlab.methods._routing_common.RoutePlan`), the block metadata of each row's newest block is
recomputed on the device, and scoring plus top-k is one launch (on CUDA the fused Triton kernel
:func:`kvlab.kernels.block_scoring.block_select`, elsewhere its torch twin), so a decode step of
block-route can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.gqa import group_queries
from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore, ceil_div
from kvlab.errors import check
from kvlab.kernels import dispatch
from kvlab.methods._routing_common import BlockMeta, RoutePlan, RoutingMethod, ascending, grouped_query, rowwise_mv
from kvlab.methods.base import register


@register
@dataclass
class BlockRoute(RoutingMethod):
    """Read the top-k blocks per KV head by centroid or Quest-bound score; sink and newest blocks always.

    ``refresh``: re-select every ``refresh`` decode steps, reusing the previous selection (plus the
    current sink and newest blocks) in between.
    """

    name: ClassVar[str] = "block-route"
    summary: ClassVar[str] = "position-aware routing: top-k contiguous blocks per KV head (centroid or Quest bound)"

    score: str = "centroid"
    score_block: int | None = None
    refresh: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.score in ("centroid", "bound"), f"score must be 'centroid' or 'bound', got {self.score!r}")
        sb = self.score_block if self.score_block is not None else self.block_size
        check(sb >= 1 and sb & (sb - 1) == 0 and sb <= self.block_size,
              f"score_block must be a power of two from 1 to block_size ({self.block_size}), got {sb}")
        check(self.refresh >= 1, f"refresh must be >= 1 decode step, got {self.refresh}")
        self._sub = sb
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._meta: dict[int, BlockMeta] = {}
        self._prev: dict[int, torch.Tensor] = {}  # layer -> [rows, width] the last selection (refresh > 1)
        self._selected: dict[int, int] = {}  # layout version -> width of the selection last made there

    # ------------------------------------------------------------ host
    def host_plan(self, layer: LayerStore, step: int, lengths: list[int]) -> RoutePlan | None:
        plan = super().host_plan(layer, step, lengths)
        if plan is None or self.refresh == 1:
            return plan
        fresh = self._selected.get(layer.layout_version) != plan.width
        return dataclasses.replace(plan, reselect=fresh or step % self.refresh == 0)

    def prepare_layer(self, layer_idx: int, layer: LayerStore, plan: RoutePlan) -> None:
        meta = self._meta.get(layer_idx)
        if meta is None:
            meta = self._meta[layer_idx] = BlockMeta(self._sub, need_bounds=self.score == "bound",
                                                     need_centroid=self.score == "centroid")
        if meta.version != layer.layout_version:
            meta.update(layer)  # after prefill or a repack: from what the layer holds (host phase)
        if self.refresh > 1 and plan.reselect:
            prev = self._prev.get(layer_idx)
            if prev is None or prev.shape != (layer.rows, plan.width) or prev.device != layer.device:
                self._prev[layer_idx] = torch.full((layer.rows, plan.width), -1, dtype=torch.long, device=layer.device)
            self._selected[layer.layout_version] = plan.width

    # ------------------------------------------------------------ device
    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, plan: RoutePlan) -> ReadPlan:
        meta = self._meta[layer_idx]
        if self._plans is not None and query.shape[2] == 1:
            meta.update_newest(layer)  # a decode step appended one token per row
        else:
            meta.update(layer)
        nb, k = self.blocks_read(layer.lengths)
        b, h, bs = layer.batch, layer.kv_heads, self.block_size
        if not plan.reselect:
            return self._reuse(layer_idx, layer, plan, nb, k)
        kw = {"centroids": meta.centroid} if self.score == "centroid" else {"kmin": meta.kmin, "kmax": meta.kmax}
        table, tokens = dispatch.block_select(group_queries(query, h), layer.lengths, k, plan.width, bs,
                                              unit=self._sub, sink_blocks=self.sink_blocks,
                                              local_blocks=self.local_blocks, **kw)
        if self.refresh > 1:
            self._prev[layer_idx].copy_(table)
        return ReadPlan("blocks", table.view(b, h, -1), block_size=bs, ascending=True, tokens=tokens.view(b, h))

    def _reuse(self, layer_idx: int, layer: LayerStore, plan: RoutePlan, nb: torch.Tensor,
               k: torch.Tensor) -> ReadPlan:
        """Between re-selections: the previous selection, plus the current sink and newest blocks."""
        prev = self._prev[layer_idx]
        width = ceil_div(layer.max_capacity_tokens, self.block_size)
        device = layer.device
        cols = torch.arange(width, device=device)[None, :]
        chosen = torch.zeros(layer.rows, width + 1, dtype=torch.bool, device=device)
        chosen.scatter_(1, torch.where(prev >= 0, prev, width), True)
        in_row = cols < nb[:, None]
        chosen = (chosen[:, :width] | self.forced_blocks(nb, width) | (k >= nb)[:, None]) & in_row
        index = ascending(torch.where(chosen, cols, -1))[:, :plan.width + self.sink_blocks + self.local_blocks]
        return ReadPlan("blocks", index.view(layer.batch, layer.kv_heads, -1), block_size=self.block_size,
                        ascending=True)

    # ------------------------------------------------------------ diagnostic
    def block_scores(self, layer_idx: int, layer: LayerStore, query: torch.Tensor) -> torch.Tensor:
        """``[rows, blocks]`` scores of every block (summed over each GQA group; -inf past a row's end)."""
        meta = self._meta.get(layer_idx)
        if meta is None:
            meta = self._meta[layer_idx] = BlockMeta(self._sub, need_bounds=self.score == "bound",
                                                     need_centroid=self.score == "centroid")
        meta.update(layer)
        q = grouped_query(query, layer.kv_heads)  # [rows, G*L, D]
        nsub = ceil_div(layer.max_length, self._sub)
        if self.score == "centroid":
            s = rowwise_mv(meta.centroid[:, :nsub], q.sum(1))
        else:  # Σ_i max(q_i min_i, q_i max_i) = q⁺·max + q⁻·min, summed over the group
            s = rowwise_mv(meta.kmax[:, :nsub], q.clamp(min=0).sum(1))
            s += rowwise_mv(meta.kmin[:, :nsub], q.clamp(max=0).sum(1))
        filled = torch.arange(nsub, device=s.device)[None, :] * self._sub < layer.lengths.to(s.device)[:, None]
        s = torch.where(filled, s.nan_to_num(nan=-torch.inf), -torch.inf)
        r = self.block_size // self._sub
        if r > 1:
            nb = -(-nsub // r)
            s = torch.nn.functional.pad(s, (0, nb * r - nsub), value=-torch.inf).view(s.shape[0], nb, r).amax(-1)
        return s
