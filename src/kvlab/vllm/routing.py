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
- :func:`select_pages` -- per routed layer: score each decode request's sub-pages against its query
  (summed over the query heads of each GQA group and over the KV heads, because vLLM's kernel takes one
  block table per request: the selection is per request and layer), take a page's score as the max of its
  sub-pages, keep the top pages within the budget, and return them in logical order. Written into the
  block table with the plan's ``seq_lens``, they make vLLM's own paged kernel read only those pages:
  every selected page but the newest is full, and the newest is last, so a compacted request of ``k``
  pages holds ``(k - 1) * page_size + tokens in the newest page`` keys, which causal decode reads whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.methods.base import Method


@dataclass
class StepPlan:
    """The reads of one engine step's decode requests, shared by every routed layer (built on the host
    by :func:`plan_step`).

    For the first ``num_decodes`` requests (vLLM orders decodes first): ``pages`` ``[nd, P]`` physical
    ids in logical order (0-padded), ``sub_valid`` ``[nd, P * R]`` which sub-pages hold tokens,
    ``page_valid``/``forced`` ``[nd, P]`` (``forced``: the sink and newest pages), ``keep`` ``[nd, kmax]``
    (slot < the request's page budget), ``k`` ``[nd]``; ``seq_lens``: the whole batch's, decode rows
    compacted to what they read.
    """

    num_decodes: int
    pages: torch.Tensor
    sub_valid: torch.Tensor
    page_valid: torch.Tensor
    forced: torch.Tensor
    keep: torch.Tensor
    k: torch.Tensor
    seq_lens: torch.Tensor


def plan_step(method: Method, block_table: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
              page_size: int, score_block: int) -> StepPlan | None:
    """The plan of one step for ``block-route`` (``method``: a validated :class:`BlockRoute`), or ``None``
    when no decode request reads less than everything (vLLM's own call then runs unchanged).

    ``block_table`` ``[reqs, max_pages]`` and ``seq_lens`` ``[reqs]`` (tokens in the cache, this step's
    included): vLLM's host tensors for the step; the first ``num_decodes`` requests are decodes.
    """
    if num_decodes == 0:
        return None
    nd = num_decodes
    lengths = seq_lens[:nd].long()
    n = (lengths + page_size - 1) // page_size
    budgets = method.row_budgets(lengths)
    dense = budgets >= lengths
    forced_n = torch.clamp(n, max=method.sink_blocks + method.local_blocks)
    k = torch.where(dense, n, torch.minimum(torch.maximum(budgets // page_size, forced_n), n))
    if bool((k >= n).all()):
        return None  # every decode request reads everything: vLLM's own call, exactly vanilla
    width = int(n.max())
    kmax = int(k.max())
    cols = torch.arange(width)[None, :]
    page_valid = cols < n[:, None]
    tail = lengths - (n - 1) * page_size
    compact = seq_lens.clone()
    compact[:nd] = torch.where(k >= n, lengths, (k - 1) * page_size + tail).to(seq_lens.dtype)
    return StepPlan(
        num_decodes=nd,
        pages=block_table[:nd, :width].long(),
        sub_valid=torch.arange(width * (page_size // score_block))[None, :] * score_block < lengths[:, None],
        page_valid=page_valid,
        forced=((cols < method.sink_blocks) | (cols >= (n - method.local_blocks)[:, None])) & page_valid,
        keep=torch.arange(kmax)[None, :] < k[:, None],
        k=k,
        seq_lens=compact)


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
    """The pages each decode request reads at this layer: ``(physical ids int32, logical indices)``, both
    ``[nd, kmax]`` in logical order; a request with budget ``k`` uses its first ``k`` entries (the rest
    are never read).

    ``query``: ``[nd, H_q, D]``, the decode queries of the routed requests.
    """
    nd, hq, d = query.shape
    pages = plan.pages.to(query.device)
    width = pages.shape[1]
    subs = width * summaries.r
    kv_heads = (summaries.kmin if summaries.bounds else summaries.ksum).shape[1]
    q = query.float().view(nd, kv_heads, hq // kv_heads, d)  # query head h * G + g serves KV head h
    if summaries.bounds:  # Σ_g max(q_g·min, q_g·max) = (Σ_g q_g⁺)·max + (Σ_g q_g⁻)·min
        qpos = q.clamp(min=0).sum(2).view(nd, -1, 1)
        qneg = q.clamp(max=0).sum(2).view(nd, -1, 1)
        dtype = summaries.kmax.dtype  # the keys' own dtype: a min or max of keys is exact in it
        s = torch.bmm(summaries.view("kmax")[pages].view(nd, subs, -1), qpos.to(dtype)).float()
        s += torch.bmm(summaries.view("kmin")[pages].view(nd, subs, -1), qneg.to(dtype)).float()
    else:  # q · mean key = (q · key sum) / count
        s = torch.bmm(summaries.view("ksum")[pages].view(nd, subs, -1), q.sum(2).view(nd, -1, 1))
        s = s / summaries.view("count")[pages].view(nd, subs, 1).clamp(min=1)
    s = torch.where(plan.sub_valid.to(s.device), s[:, :, 0].nan_to_num(nan=-torch.inf), -torch.inf)
    page_score = s.view(nd, width, summaries.r).amax(-1)
    page_score = torch.where(plan.forced.to(s.device), torch.inf, page_score)
    page_score = torch.where(plan.page_valid.to(s.device), page_score, -torch.inf)
    kmax = plan.keep.shape[1]
    top = page_score.topk(kmax, dim=1).indices
    big = torch.iinfo(torch.long).max
    order = torch.where(plan.keep.to(s.device), top, big).sort(1).values.clamp(max=width - 1)
    return pages.gather(1, order).to(torch.int32), order


def compact_block_table(block_table: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``block_table`` with the first ``len(selected)`` rows starting with the ``selected`` pages."""
    table = block_table.clone()
    table[: selected.shape[0], : selected.shape[1]] = selected.to(table.dtype)
    return table
