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
(:class:`~kvlab.methods.routing.RoutePlan`), the block metadata of each row's newest block is
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
from kvlab.kernels import dispatch, reference
from kvlab.kernels.selection import ascending
from kvlab.methods.base import register
from kvlab.methods.routing import RoutePlan, RoutingMethod


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
    def _summaries(self, meta: BlockMeta) -> dict[str, torch.Tensor]:
        return {"centroids": meta.centroid} if self.score == "centroid" else {"kmin": meta.kmin, "kmax": meta.kmax}

    def _block_meta(self, layer_idx: int) -> BlockMeta:
        meta = self._meta.get(layer_idx)
        if meta is None:
            meta = self._meta[layer_idx] = BlockMeta(self._sub, need_bounds=self.score == "bound",
                                                     need_centroid=self.score == "centroid")
        return meta

    def host_plan(self, layer: LayerStore, step: int, lengths: list[int]) -> RoutePlan | None:
        plan = super().host_plan(layer, step, lengths)
        if plan is None or self.refresh == 1:
            return plan
        fresh = self._selected.get(layer.layout_version) != plan.width
        return dataclasses.replace(plan, reselect=fresh or step % self.refresh == 0)

    def prepare_layer(self, layer_idx: int, layer: LayerStore, plan: RoutePlan) -> None:
        meta = self._block_meta(layer_idx)
        meta.update(layer)  # up to what the layer holds: nothing to do while decode steps keep it in step
        if all(n - m <= 1 for n, m in zip(plan.lengths, layer.lengths_host, strict=True)):
            meta.lengths = list(plan.lengths)  # the step's select recomputes each row's newest block
        if self.refresh > 1 and plan.reselect:
            prev = self._prev.get(layer_idx)
            if prev is None or prev.shape != (layer.rows, plan.width) or prev.device != layer.device:
                self._prev[layer_idx] = torch.full((layer.rows, plan.width), -1, dtype=torch.long, device=layer.device)
            self._selected[layer.layout_version] = plan.width

    # ------------------------------------------------------------ device
    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, plan: RoutePlan,
               backend: str) -> ReadPlan:
        meta = self._meta[layer_idx]
        if query.shape[2] == 1:
            meta.update_newest(layer)  # a decode step appended one token per row
        else:
            meta.update(layer)  # a chunk of forced tokens (eager): from the host lengths
        nb, k = self.blocks_read(layer.lengths)
        b, h, bs = layer.batch, layer.kv_heads, self.block_size
        if not plan.reselect:
            return self._reuse(layer_idx, layer, plan, nb, k)
        table, tokens = dispatch.block_select(group_queries(query, h), layer.lengths, k, plan.width, bs,
                                              unit=self._sub, sink_blocks=self.sink_blocks,
                                              local_blocks=self.local_blocks, backend=backend,
                                              **self._summaries(meta))
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
        """``[rows, blocks]`` scores of every block (summed over each GQA group; -inf past a row's end): what
        :meth:`select` ranks (:func:`kvlab.kernels.reference.row_block_scores`)."""
        meta = self._block_meta(layer_idx)
        meta.update(layer)
        scores = reference.row_block_scores(group_queries(query, layer.kv_heads), layer.lengths, self.block_size,
                                            unit=self._sub, **self._summaries(meta))
        return scores[:, :ceil_div(layer.max_length, self.block_size)]


# ---------------------------------------------------------------- block metadata
class BlockMeta:
    """Centroid, min and max of the keys in every ``unit``-token block of each row of one layer.

    ``centroid``/``kmin``/``kmax``: ``[rows, units, D]`` in the keys' dtype (computed in fp32), sized to
    the layer's capacity, so decode never regrows them (a partial last block covers the tokens it has;
    an empty block has centroid 0, min +inf and max -inf). Two updates:

    - :meth:`update` (host-driven): rebuild after the layer's layout changed or a row shrank, else
      recompute only the blocks that gained tokens since the previous update;
    - :meth:`update_newest` (device only, fixed shape): after a decode append, recompute each row's
      newest block -- what a decode step changes, and what a CUDA graph can replay. The host record
      (``lengths``) is the caller's to advance, before the step (``BlockRoute.prepare_layer``).
    """

    CHUNK_TOKENS = 4096

    def __init__(self, unit: int, need_bounds: bool = True, need_centroid: bool = True) -> None:
        self.unit = unit
        self.need_bounds = need_bounds
        self.need_centroid = need_centroid
        self.lengths: list[int] | None = None  # host lengths at the last update
        self.version = -1
        self.centroid = self.kmin = self.kmax = torch.empty(0)
        self.capacity = 0  # blocks per row held
        self.blocks_recomputed = 0  # how many (row, block) entries the last update recomputed

    def update(self, layer: LayerStore) -> None:
        u = self.unit
        lengths = list(layer.lengths_host)
        nb = ceil_div(max(lengths, default=0), u)
        rebuild = (self.version != layer.layout_version or self.lengths is None
                   or any(n < m for n, m in zip(lengths, self.lengths, strict=True))
                   or ceil_div(layer.max_capacity_tokens, u) > self.capacity)
        if rebuild:
            self._allocate(layer)
            b0 = 0
        else:
            changed = [m for n, m in zip(lengths, self.lengths, strict=True) if n != m]
            if not changed:
                self.blocks_recomputed = 0
                return
            b0 = min(changed) // u
        self._compute(layer, b0, nb)
        self.blocks_recomputed = (nb - b0) * layer.rows
        self.lengths = lengths
        self.version = layer.layout_version

    def update_newest(self, layer: LayerStore) -> None:
        """Recompute each row's block holding its newest token, from the pool (device work only)."""
        u, device = self.unit, layer.device
        lengths = layer.lengths
        block = ((lengths - 1).clamp(min=0) // u)  # [rows]
        slots = block[:, None] * u + torch.arange(u, device=device)[None, :]  # [rows, u]
        valid = (slots < lengths[:, None])[..., None]
        phys = layer.row_base[:, None] + torch.minimum(slots, (lengths - 1).clamp(min=0)[:, None])
        k = layer.keys[phys].float()  # [rows, u, D]
        rows = torch.arange(layer.rows, device=device)
        self._store(rows, block, k, valid)

    def _allocate(self, layer: LayerStore) -> None:
        self.capacity = max(ceil_div(layer.max_capacity_tokens, self.unit), 1)
        shape = (layer.rows, self.capacity, layer.head_dim)
        dev, dtype = layer.device, layer.dtype
        empty = torch.empty(0, device=dev, dtype=dtype)
        self.centroid = torch.zeros(shape, device=dev, dtype=dtype) if self.need_centroid else empty
        self.kmin = torch.full(shape, torch.inf, device=dev, dtype=dtype) if self.need_bounds else empty
        self.kmax = torch.full(shape, -torch.inf, device=dev, dtype=dtype) if self.need_bounds else empty

    def _store(self, rows: torch.Tensor, blocks: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> None:
        """Summaries of key groups ``k`` ``[..., u, D]`` (``valid`` ``[..., u, 1]``) into ``[rows, blocks]``."""
        centroid, kmin, kmax = reference.key_summaries(k, valid, self.need_centroid, self.need_bounds)
        if self.need_centroid:
            self.centroid[rows, blocks] = centroid.to(self.centroid.dtype)
        if self.need_bounds:
            self.kmin[rows, blocks] = kmin.to(self.kmin.dtype)
            self.kmax[rows, blocks] = kmax.to(self.kmax.dtype)

    def _compute(self, layer: LayerStore, b0: int, b1: int) -> None:
        u, dev = self.unit, layer.device
        lengths = layer.lengths
        base = layer.row_base
        last = (lengths - 1).clamp(min=0)
        step = max(1, self.CHUNK_TOKENS // u)
        rows = torch.arange(layer.rows, device=dev)[:, None]
        for c0 in range(b0, b1, step):
            c1 = min(b1, c0 + step)
            slots = torch.arange(c0 * u, c1 * u, device=dev)[None, :]
            valid = (slots < lengths[:, None]).view(layer.rows, c1 - c0, u, 1)
            phys = base[:, None] + torch.minimum(slots, last[:, None])
            k = layer.keys[phys].float().view(layer.rows, c1 - c0, u, -1)
            self._store(rows, torch.arange(c0, c1, device=dev)[None, :], k, valid)
