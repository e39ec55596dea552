"""Block-route on vLLM's paged KV cache: page summaries, one plan per step, one selection per layer.

Plain PyTorch on vLLM's tensors, no vLLM import, so it reads (and is tested) on its own:

- :class:`PageSummaries` -- per layer, a side buffer indexed by vLLM's *physical* block id: the centroid
  (MoBA, arXiv 2502.13189) or the element-wise min/max (Quest, arXiv 2406.10774) of the keys of every
  ``score_block``-token sub-page (LServe's logical pages inside physical pages, arXiv 2502.14866).
  :meth:`PageSummaries.update` folds in the keys vLLM writes, at the slots it writes them to (a partial
  page is summarised over the tokens it has), so summaries follow pages through prefix caching.
- :func:`plan_step` -- once per engine step, on the host: for each decode request its pages, its page
  budget, the pages it must read (the sink page and the newest page) and the ``seq_lens`` of the
  compacted read. Every routed layer of the step shares it, so a layer does no host work and reads
  nothing back.
- :func:`select_pages` -- per routed layer, kvlab's own block-route selection on one row per decode
  request: the request's sub-page summaries and its query heads laid out as one row over all KV heads
  (vLLM's kernel takes one block table per request, so the selection is per request and layer, the scores
  summed over the query heads of each GQA group and over the KV heads), scored by
  :func:`kvlab.kernels.reference.row_block_scores` (a page scores the max of its sub-pages), the sink and
  newest pages forced (:func:`kvlab.kernels.selection.forced_blocks`, in the plan) and the top pages within
  the budget kept by :func:`kvlab.kernels.selection.top_blocks` -- forced pages first, ties to the lowest
  page, in logical order -- exactly as kvlab's block-route selects a row. Written into the
  block table with the plan's ``seq_lens``, they make vLLM's own paged kernel read only those pages:
  every selected page but the newest is full, and the newest is last, so a compacted request of ``k``
  pages holds ``(k - 1) * page_size + tokens in the newest page`` keys, which causal decode reads whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.errors import check
from kvlab.kernels.reference import row_block_scores
from kvlab.kernels.selection import forced_blocks, top_blocks
from kvlab.methods.block_route import BlockRoute


@dataclass
class StepPlan:
    """The reads of one engine step's decode requests, shared by every routed layer (built on the host
    by :func:`plan_step`).

    For the first ``num_decodes`` requests (vLLM orders decodes first): ``pages`` ``[nd, P]`` physical
    ids in logical order (0-padded), ``sub_valid`` ``[nd, P * R]`` which sub-pages hold tokens,
    ``page_valid``/``forced`` ``[nd, P]`` (``forced``: the sink and newest pages), ``keep`` ``[nd, kmax]``
    (slot < the request's page budget), ``k`` ``[nd]``; ``seq_lens``: the whole batch's, decode rows
    compacted to what they read. The masks are what a layer reads on the device: :func:`select_pages`
    counts its tokens, pages and budget from them (no host value per layer).
    """

    num_decodes: int
    pages: torch.Tensor
    sub_valid: torch.Tensor
    page_valid: torch.Tensor
    forced: torch.Tensor
    keep: torch.Tensor
    k: torch.Tensor
    seq_lens: torch.Tensor
    head_groups: int = 1  # pages chosen per group of KV heads: 1 (one list a request) or every KV head its own


def plan_step(method: BlockRoute, block_table: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
              page_size: int, score_block: int, head_groups: int = 1) -> StepPlan | None:
    """The plan of one step for ``block-route`` (``method``: a validated :class:`BlockRoute` whose
    ``block_size`` is the page size), or ``None`` when no decode request reads less than everything (vLLM's
    own call then runs unchanged).

    ``block_table`` ``[reqs, max_pages]`` and ``seq_lens`` ``[reqs]`` (tokens in the cache, this step's
    included): vLLM's host tensors for the step; the first ``num_decodes`` requests are decodes. Pages and
    budgets follow kvlab's block-route: :meth:`~kvlab.methods.routing.RoutingMethod.blocks_read`, at least
    the forced pages of :func:`kvlab.kernels.selection.forced_blocks`.
    """
    if num_decodes == 0:
        return None
    check(method.block_size == page_size, f"block-route's block_size {method.block_size} is not vLLM's page "
                                          f"size {page_size}")
    nd = num_decodes
    lengths = seq_lens[:nd].long()
    n, k = method.blocks_read(lengths)
    width = int(n.max())
    forced = forced_blocks(n, width, method.sink_blocks, method.local_blocks)
    k = torch.maximum(k, forced.sum(1))
    if bool((k >= n).all()):
        return None  # every decode request reads everything: vLLM's own call, exactly vanilla
    tail = lengths - (n - 1) * page_size
    compact = seq_lens.clone()
    compact[:nd] = torch.where(k >= n, lengths, (k - 1) * page_size + tail).to(seq_lens.dtype)
    return StepPlan(
        num_decodes=nd,
        pages=block_table[:nd, :width].long(),
        sub_valid=torch.arange(width * (page_size // score_block))[None, :] * score_block < lengths[:, None],
        page_valid=torch.arange(width)[None, :] < n[:, None],
        forced=forced,
        keep=torch.arange(int(k.max()))[None, :] < k[:, None],
        k=k,
        seq_lens=compact,
        head_groups=head_groups)


class PageSummaries:
    """Key summaries of every sub-page of one layer's paged cache, indexed by physical block id.

    ``ksum`` (centroid: the key sum in float32, divided by ``count`` when scored) or ``kmin``/``kmax``
    (bound, in the keys' dtype): ``[num_blocks, R, H_kv, D]`` with ``R = page_size // score_block``; ``count``
    ``[num_blocks, R]``: tokens each sub-page summarises. They are updated from the keys vLLM writes
    and the slots it writes them to (:meth:`update`), never read back from the cache, whose layout inside
    a block belongs to vLLM's kernel (transposed or packed per CPU instruction set).
    """

    def __init__(self, num_blocks: int, page_size: int, score_block: int, kv_heads: int, head_dim: int,
                 bounds: bool, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.page_size, self.score_block = page_size, score_block
        self.r = page_size // score_block
        self.kv_heads = kv_heads
        self.bounds = bounds
        # One spare sub-page at the end absorbs padding slots (-1). Min/max are kept in the keys' dtype (exact,
        # and half the bytes to read in bf16); sums in float32. Unwritten sub-pages hold 0, never ±inf.
        shape = (num_blocks * self.r + 1, kv_heads, head_dim)
        if bounds:
            self.kmin = torch.zeros(shape, device=device, dtype=dtype)
            self.kmax = torch.zeros(shape, device=device, dtype=dtype)
        else:
            self.ksum = torch.zeros(shape, device=device)
        self.count = torch.zeros(shape[0], dtype=torch.int32, device=device)
        self.num_blocks = num_blocks

    def view(self, name: str) -> torch.Tensor:
        """``ksum``/``kmin``/``kmax`` as ``[num_blocks, R, H, D]``, ``count`` as ``[num_blocks, R]``."""
        t = getattr(self, name)[:-1]
        return t.view(self.num_blocks, self.r, *t.shape[1:])

    def rows(self, pages: torch.Tensor, groups: int = 1) -> dict[str, torch.Tensor]:
        """The summaries of the sub-pages of ``pages`` ``[rows, P]`` (physical ids), one row per request and
        group of ``H / groups`` KV heads (request-major), as :func:`kvlab.kernels.reference.row_block_scores`
        takes them: ``centroids`` (the key sum over the count) or ``kmin``/``kmax``, each
        ``[rows * groups, P * R, H / groups * D]``."""
        rows, width = pages.shape
        n = width * self.r
        sub = (pages.long()[:, :, None] * self.r + torch.arange(self.r, device=pages.device)).view(rows, 1, n)
        # Row (request, group) of sub-page s is row s * groups + group of the [slots * groups, H / groups * D]
        # view: one index_select per tensor (several times faster on the CPU than advanced indexing), no transpose.
        index = (sub * groups + torch.arange(groups, device=pages.device)[None, :, None]).flatten()

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0] * groups, -1).index_select(0, index).view(rows * groups, n, -1)

        if self.bounds:
            return {name: gather(getattr(self, name)) for name in ("kmin", "kmax")}
        count = self.count.index_select(0, sub.flatten()).clamp(min=1).view(rows, 1, n, 1)
        return {"centroids": gather(self.ksum).view(rows, groups, n, -1).div_(count).view(rows * groups, n, -1)}

    def tokens(self) -> torch.Tensor:
        """``[num_blocks]``: tokens summarised in each physical page."""
        return self.view("count").sum(1)

    def update(self, key: torch.Tensor, slots: torch.Tensor) -> None:
        """Fold the keys ``[T, H, D]`` that vLLM wrote to ``slots`` ``[T]`` into their sub-pages.

        A step writes each sub-page as one run of consecutive slots (a request's tokens in order); a run
        that starts at the sub-page's first slot starts it afresh (a new or reused page).
        """
        t = slots.shape[0]
        if t == 0:
            return
        spare = self.count.shape[0] - 1
        slots = slots.long()
        sub = torch.where(slots >= 0, slots // self.score_block, spare)
        offset = slots % self.score_block
        new_run = torch.ones(t, dtype=torch.bool, device=sub.device)
        new_run[1:] = sub[1:] != sub[:-1]
        run = torch.cumsum(new_run, 0) - 1
        first_offset = torch.zeros(t, dtype=offset.dtype, device=sub.device).scatter_(0, run[new_run], offset[new_run])
        fresh = (first_offset[run] == 0)[:, None, None]  # the same for every token of a run
        # A write at a page's first slot starts the whole page afresh (its later sub-pages held another request).
        starts = (slots >= 0) & (slots % self.page_size == 0)
        page_subs = torch.where(starts[:, None], (slots // self.page_size * self.r)[:, None]
                                + torch.arange(self.r, device=sub.device), spare).flatten()
        self.count[page_subs] = 0
        if self.bounds:
            k = key.to(self.kmin.dtype)
            self.kmin[sub] = torch.where(fresh, torch.inf, self.kmin[sub])
            self.kmax[sub] = torch.where(fresh, -torch.inf, self.kmax[sub])
            index = sub[:, None, None].expand_as(k)
            self.kmin.scatter_reduce_(0, index, k, "amin")
            self.kmax.scatter_reduce_(0, index, k, "amax")
        else:
            self.ksum[sub] = torch.where(fresh, 0.0, self.ksum[sub])
            self.ksum.index_add_(0, sub, key.float())
        self.count[sub] = torch.where(fresh[:, 0, 0], 0, self.count[sub])
        self.count.index_add_(0, sub, torch.ones(t, dtype=torch.int32, device=sub.device))


def select_pages(query: torch.Tensor, plan: StepPlan, summaries: PageSummaries) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages each decode request reads at this layer, per group of its KV heads (``plan.head_groups``:
    1, one list for every head, or one per KV head): ``(physical ids int32, logical indices)``, both
    ``[nd, groups, kmax]`` in logical order; a request with budget ``k`` uses its first ``k`` entries (past
    them the logical indices are -1 and the physical ids its first page, never read).

    ``query``: ``[nd, H_q, D]``, the decode queries of the routed requests. kvlab's block-route selection
    on one row per request (:func:`kvlab.kernels.reference.block_select_ref`'s steps):
    :func:`~kvlab.kernels.reference.row_block_scores`, then :func:`~kvlab.kernels.selection.top_blocks` with
    the plan's forced pages -- ties to the lowest page. Device work only: no value is read back.
    """
    device, groups = query.device, plan.head_groups
    nd = query.shape[0]

    def per_row(t: torch.Tensor) -> torch.Tensor:  # one row per request and head group
        return t.to(device).repeat_interleave(groups, 0)

    pages = per_row(plan.pages)
    keep = per_row(plan.keep)
    # row_block_scores keeps sub-page j iff j * score_block < length: the sub-pages that hold tokens
    lengths = per_row(plan.sub_valid).sum(1) * summaries.score_block
    scores = row_block_scores(request_rows(query, summaries.kv_heads, groups), lengths, summaries.page_size,
                              unit=summaries.score_block, **summaries.rows(plan.pages.to(device), groups))
    logical = top_blocks(scores, per_row(plan.page_valid).sum(1), keep.sum(1), keep.shape[1], per_row(plan.forced))
    physical = pages.gather(1, logical.clamp(min=0)).to(torch.int32)
    return physical.view(nd, groups, -1), logical.view(nd, groups, -1)


def request_rows(query: torch.Tensor, kv_heads: int, groups: int = 1) -> torch.Tensor:
    """``[nd, H_q, D]`` -> ``[nd * groups, 1, G, H_kv / groups * D]``: each request's queries as one GQA row
    per group of KV heads (query head ``h * G + g`` serves KV head ``h``, as
    :func:`kvlab.attention.gqa.group_queries`), so a row's score sums the group's query heads and its KV
    heads."""
    nd, hq, d = query.shape
    g = hq // kv_heads
    per = kv_heads // groups
    return query.view(nd, groups, per, g, d).transpose(2, 3).reshape(nd * groups, 1, g, per * d)


def compact_block_table(block_table: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``block_table`` with the first ``len(selected)`` rows starting with the ``selected`` pages."""
    table = block_table.clone()
    table[: selected.shape[0], : selected.shape[1]] = selected.to(table.dtype)
    return table
