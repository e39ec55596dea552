"""``cluster-route``: similarity-aware decode-time routing, the comparator of ``block-route``.

Follows ClusterKV (Liu et al., 2024, "ClusterKV: Manipulating LLM KV Cache in Semantic Space for
Recallable Compression", arXiv 2412.03213): at the end of prefill each (layer, KV head)'s keys are
clustered by k-means on cosine similarity; at each decode step the query is scored against the
cluster centroids (q · mean key, summed over the GQA group) and whole clusters are read, best first,
until the budget is filled. Sinks and the local window are the same blocks ``block-route`` always
reads, so the two differ only in how the rest is chosen. New decode tokens stay in the local window
and are assigned to their nearest centroid every ``recluster`` steps (at the latest when they leave
the window).

A decode step does only device work with fixed shapes (the step's new token joins its nearest
cluster, the clusters are scored and taken, the selection has the plan's fixed width), so it can be
captured in a CUDA graph like block-route's. The selected tokens are scattered in memory and read
with a token-granular gather. With
``relayout=true`` each head's clustered tokens are physically reordered after clustering so every
cluster is contiguous (positions travel with the keys, so RoPE and masks are unaffected); the tokens
of a cluster then form one run and are read run by run. ``relayout_seconds`` records what it cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvlab.attention.gqa import query_rows
from kvlab.attention.plans import ReadPlan
from kvlab.attention.sparse import row_threads
from kvlab.cache.store import KVStore, LayerStore, ceil_div_tensor
from kvlab.errors import check
from kvlab.kernels.selection import ascending, rowwise_mv
from kvlab.methods.base import PrefillContext, register
from kvlab.methods.routing import RoutePlan, RoutingMethod


def cosine_kmeans(x: torch.Tensor, clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on cosine similarity of ``x`` ``[n, D]``: ``(assignment [n], unit centroids [C, D])``.

    Deterministic: starts from evenly spaced points; an emptied cluster keeps its previous centroid.
    """
    n = x.shape[0]
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    c = xn[torch.linspace(0, n - 1, clusters, device=x.device).round().long()].clone()
    assign = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        assign = (xn @ c.T).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, xn)
        filled = sums.norm(dim=-1, keepdim=True) > 0
        c = torch.where(filled, torch.nn.functional.normalize(sums, dim=-1), c)
    assign = (xn @ c.T).argmax(1)
    return assign, c


@dataclass
class _LayerClusters:
    assign: torch.Tensor  # [rows, cap] cluster of each logical slot, -1 = not assigned
    dirs: torch.Tensor  # [rows, C, D] unit centroids (assignment)
    means: torch.Tensor  # [rows, C, D] mean key of each cluster (scoring)
    exists: torch.Tensor  # [rows, C] clusters that have members


@register
@dataclass
class ClusterRoute(RoutingMethod):
    """Read whole key clusters, best centroid first, until the budget is filled; sinks and local window always."""

    name: ClassVar[str] = "cluster-route"
    summary: ClassVar[str] = "similarity-aware routing: cosine k-means clusters per KV head (ClusterKV); --relayout"

    cluster_size: int = 32
    iters: int = 10
    recluster: int = 16
    relayout: bool = False
    stats: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.cluster_size >= 1, f"cluster_size must be >= 1 token (the average cluster size), "
                                      f"got {self.cluster_size}")
        check(self.iters >= 1, f"iters must be >= 1 k-means iteration, got {self.iters}")
        check(self.recluster >= 1, f"recluster must be >= 1 decode step, got {self.recluster}")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._layers: dict[int, _LayerClusters] = {}
        self.stats = {"cluster_seconds": 0.0, "relayout_seconds": 0.0}

    # ------------------------------------------------------------ prefill: cluster (and relayout)
    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        super().prefill_end(store, ctx)
        with row_threads():  # many small matmuls: one thread each (see kvlab.attention.sparse.row_threads)
            for i in store.compressible_layers():
                if not self.is_dense(i):
                    self._layers[i] = self._cluster_layer(store.layers[i])

    def _span(self, length: int) -> tuple[int, int]:
        """Slots clustered at prefill: between the sink blocks and the local window."""
        s = min(self.sink_blocks * self.block_size, length)
        nb = -(-length // self.block_size)
        return s, max(s, (nb - self.local_blocks) * self.block_size)

    def _cluster_layer(self, layer: LayerStore) -> _LayerClusters:
        rows, d, dev = layer.rows, layer.head_dim, layer.keys.device  # the clusters live where the keys are
        spans = [self._span(n) for n in layer.lengths_host]
        c_max = max(1, max(-(-(e - s) // self.cluster_size) for s, e in spans))
        cap = max(layer.max_capacity_tokens, layer.max_length)
        assign = torch.full((rows, cap), -1, dtype=torch.long, device=dev)
        dirs = torch.zeros(rows, c_max, d, device=dev)
        means = torch.zeros(rows, c_max, d, device=dev)
        exists = torch.zeros(rows, c_max, dtype=torch.bool, device=dev)
        for row, (s, e) in enumerate(spans):
            if e <= s:
                continue
            t0 = time.perf_counter()
            first = layer.start_host[row] * layer.block_size
            keys = layer.keys[first + s: first + e]
            clusters = -(-(e - s) // self.cluster_size)
            a, c = cosine_kmeans(keys, clusters, self.iters)
            dirs[row, :clusters] = c
            counts = torch.bincount(a, minlength=clusters)
            sums = torch.zeros(clusters, d, device=dev).index_add_(0, a, keys.float())
            means[row, :clusters] = sums / counts.clamp(min=1)[:, None]
            exists[row, :clusters] = counts > 0
            t1 = time.perf_counter()
            self.stats["cluster_seconds"] += t1 - t0
            if self.relayout:
                order = torch.sort(a, stable=True).indices  # cluster by cluster, original order inside
                src = slice(first + s, first + e)
                layer.keys[src] = layer.keys[src][order]
                layer.values[src] = layer.values[src][order]
                layer.positions[src] = layer.positions[src][order]
                a = a[order]
                self.stats["relayout_seconds"] += time.perf_counter() - t1
            assign[row, s:e] = a
        state = _LayerClusters(assign, dirs, means, exists)
        # the local window joins its nearest clusters now (it is read whole until it leaves the window)
        slots = torch.arange(cap, device=dev)[None, :]
        tail = (slots >= torch.tensor([e for _, e in spans], device=dev)[:, None]) & layer.in_use(cap)
        tail &= slots >= self.sink_blocks * self.block_size
        if bool(tail.any()):
            self._assign_new(layer, state, tail)
        return state

    # ------------------------------------------------------------ decode
    def _forced(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """``[rows, width]``: the tokens of the sink and local blocks (always read)."""
        slots = torch.arange(width, device=lengths.device)[None, :]
        nb = ceil_div_tensor(lengths, self.block_size)
        return self.forced_blocks(nb, width, self.block_size) & (slots < lengths[:, None])

    def _assign_new(self, layer: LayerStore, state: _LayerClusters, todo: torch.Tensor) -> None:
        """Assign the slots in ``todo`` ``[rows, T]`` to their nearest centroid (cosine)."""
        for row in todo.any(1).nonzero().flatten().tolist():
            slots = todo[row].nonzero().flatten()
            first = layer.start_host[row] * layer.block_size
            keys = torch.nn.functional.normalize(layer.keys[first + slots].float(), dim=-1)
            sim = keys @ state.dirs[row].T
            sim[:, ~state.exists[row]] = -torch.inf
            state.assign[row, slots] = sim.argmax(1)
            state.exists[row, state.assign[row, slots]] = True

    def _assign_newest(self, layer: LayerStore, state: _LayerClusters) -> None:
        """A decode step's new token (each row's newest) joins its nearest cluster: device work, fixed shapes."""
        lengths = layer.lengths
        newest = (lengths - 1).clamp(min=0)
        keys = torch.nn.functional.normalize(layer.keys[layer.row_base + newest].float(), dim=-1)  # [rows, D]
        sim = torch.bmm(state.dirs, keys[:, :, None])[:, :, 0].masked_fill(~state.exists, -torch.inf)
        cluster = sim.argmax(1)
        assigned = state.assign.gather(1, newest[:, None])[:, 0]
        join = (newest >= self.sink_blocks * self.block_size) & (assigned < 0) & (lengths > 0)
        state.assign.scatter_(1, newest[:, None], torch.where(join, cluster, assigned)[:, None])
        state.exists.scatter_(1, cluster[:, None], (state.exists.gather(1, cluster[:, None])[:, 0] | join)[:, None])

    def graph_safe(self) -> bool:
        return not self.record_recall

    def read_width(self, layer: LayerStore, lengths: list[int], budgets: list[int]) -> int:
        """Tokens: the most any row may read at any length up to the layer's capacity."""
        points = set(lengths) | {c * layer.block_size for c in layer.capacity_host}
        if self.budget_tokens is not None:
            points.add(min(self.budget_tokens, max(points)))
        return max(1, max(min(self.row_budget(n), n) for n in points))

    def prepare_layer(self, layer_idx: int, layer: LayerStore, plan: RoutePlan) -> None:
        state = self._layers.get(layer_idx)
        if state is None:  # planned without prefill_end (benchmarks): cluster now
            state = self._layers[layer_idx] = self._cluster_layer(layer)
        width = max(layer.max_capacity_tokens, layer.max_length)
        if state.assign.shape[1] < width:  # the layer grew: the assignments grow with it (host phase)
            grow = torch.full((layer.rows, width - state.assign.shape[1]), -1, dtype=torch.long, device=layer.device)
            state.assign = torch.cat([state.assign, grow], 1)

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, plan: RoutePlan,
               backend: str) -> ReadPlan:
        state = self._layers[layer_idx]
        device = layer.keys.device
        lengths = layer.lengths
        width = state.assign.shape[1]
        slots = torch.arange(width, device=device)[None, :]
        in_row = slots < lengths[:, None]
        forced = self._forced(lengths, width)
        if query.shape[2] == 1:
            self._assign_newest(layer, state)  # every decode token joins a cluster at its own step
        else:  # a chunk of forced tokens (eager): place what must be placed now
            todo = (state.assign < 0) & in_row & (slots >= self.sink_blocks * self.block_size)
            if plan.step % self.recluster != 0:
                todo &= ~forced  # in between, only tokens leaving the window must be placed now
            if bool(todo.any()):
                self._assign_new(layer, state, todo)
        assign = state.assign
        budgets = self.row_budgets(lengths)
        dense = budgets >= lengths
        # score clusters, then take whole clusters best first while they fit the budget
        q = query_rows(query, layer.kv_heads).sum(1)  # [rows, D]
        scores = rowwise_mv(state.means, q)
        scores = torch.where(state.exists, scores, -torch.inf)
        c = scores.shape[1]
        member = torch.where(forced | ~in_row | (assign < 0), c, assign)
        sizes = torch.zeros(layer.rows, c + 1, dtype=torch.long, device=device)
        sizes = sizes.scatter_add_(1, member, torch.ones_like(member))[:, :c]
        order = scores.argsort(1, descending=True)
        room = (budgets - forced.sum(1))[:, None]
        fits = sizes.gather(1, order).cumsum(1) <= room
        chosen = torch.zeros(layer.rows, c + 1, dtype=torch.bool, device=device)
        chosen[:, :c].scatter_(1, order, fits & state.exists.gather(1, order))
        sel = forced | (chosen.gather(1, member) & (member < c))
        sel |= dense[:, None] & in_row
        index = ascending(torch.where(sel, slots, -1))[:, :plan.width]
        return ReadPlan("tokens", index.view(layer.batch, layer.kv_heads, -1), ascending=True)

    def describe(self) -> dict:
        return {**super().describe(), **{k: round(v, 4) for k, v in self.stats.items()}}
