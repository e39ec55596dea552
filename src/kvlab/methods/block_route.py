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
group reads one selection. The block metadata is updated incrementally as decode appends tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore
from kvlab.errors import check
from kvlab.methods._routing_common import BlockMeta, RoutingMethod, grouped_query, rowwise_mv, top_blocks
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
        self._prev: dict[int, torch.Tensor] = {}

    def block_scores(self, layer_idx: int, layer: LayerStore, query: torch.Tensor) -> torch.Tensor:
        """``[rows, blocks]`` scores of every block (summed over each GQA group; -inf past a row's end)."""
        meta = self._meta.get(layer_idx)
        if meta is None:
            meta = self._meta[layer_idx] = BlockMeta(self._sub, need_bounds=self.score == "bound",
                                                     need_centroid=self.score == "centroid")
        meta.update(layer)
        q = grouped_query(query, layer.kv_heads)  # [rows, G*L, D]
        nsub = -(-int(layer.lengths.max()) // self._sub)
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

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: int,
               budgets: torch.Tensor) -> ReadPlan:
        nb, k, dense = self.block_budgets(layer.lengths, budgets)
        width = int(nb.max())
        device = layer.keys.device  # the selection is made where the keys are
        nb_dev = nb.to(device)
        forced = self.forced_blocks(nb_dev, width)
        prev = self._prev.get(layer_idx)
        if prev is not None and step % self.refresh != 0:
            cols = torch.arange(width, device=device)[None, :]
            chosen = torch.zeros(layer.rows, width, dtype=torch.bool, device=device)
            valid = prev >= 0
            chosen[torch.arange(layer.rows, device=device)[:, None].expand_as(prev)[valid], prev[valid]] = True
            chosen |= forced | (dense.to(device)[:, None] & (cols < nb_dev[:, None]))
            big = torch.iinfo(torch.long).max
            idx = torch.where(chosen, cols, big).sort(1).values
            idx = idx[:, : int(chosen.sum(1).max())]
            index = torch.where(idx == big, -1, idx)
        else:
            scores = self.block_scores(layer_idx, layer, query)
            index = top_blocks(scores[:, :width], nb, k, forced)
            self._prev[layer_idx] = index
        return ReadPlan("blocks", index.view(layer.batch, layer.kv_heads, -1), block_size=self.block_size)
