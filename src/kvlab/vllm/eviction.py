"""kvlab's eviction on vLLM's paged KV cache: the worker's records and what every eviction method shares.

Plain PyTorch on vLLM's tensors, no vLLM import (the vLLM classes that use it are in
:mod:`kvlab.vllm.engine` and :mod:`kvlab.vllm.backend`). vLLM's block table is *positional*: token ``p``
of a request lives in entry ``p // page``, a freed entry becomes vLLM's null block and the table never
shrinks, so vLLM's positions, ``seq_lens`` and slot mapping stay right without being touched.

What a method does is its adapter's (:mod:`kvlab.vllm.methods`): the scheduler's free range, the worker's
plan of each step, the work after each layer's attention and after the forward. Here: the step's rows
(:class:`Rows`), the compacted block table decode reads (:func:`compact_rows`), the step's plan
(:class:`EvictStep`), one layer's call (:class:`LayerCall`), and the worker's records
(:class:`WorkerState`), which the adapter reads and fills.

**Two or more ranks** (tensor parallel): each rank's worker holds its own KV heads and makes its own choices
over them, but vLLM's scheduler hears only the output rank and frees once for all. So the ranks agree
(:class:`Ranks`): a choice whose page counts depend on scores reads every rank's scores (kv-compress's
per-layer rates: the same counts as one rank), and each step's report is agreed before it is sent
(:func:`agree_reports`): a request is reported only if every rank reported it, with the adapter's
:meth:`~kvlab.vllm.methods.base.Adapter.agree` of the values (the pages no rank still reads).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("vllm.kvlab")
RECORD_ENV = "KVLAB_VLLM_RECORD"


# ---------------------------------------------------------------- one step, built by the metadata builder
@dataclass
class Rows:
    """The requests of one engine step, in vLLM's batch order (host tensors)."""

    req_ids: list[str]
    prompt: torch.Tensor  # [R] prompt lengths n
    computed: torch.Tensor  # [R] tokens in the cache before this step c
    seq: torch.Tensor  # [R] tokens in the cache after this step s
    query_start: torch.Tensor  # [R + 1] first query token of each row

    @classmethod
    def of(cls, req_ids: list[str], prompt: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor) -> Rows:
        qsl = query_start_loc.long()
        seq = seq_lens.long()
        return cls(list(req_ids), prompt.long(), seq - (qsl[1:] - qsl[:-1]), seq, qsl)


def compact_rows(table: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor,
                 skip_to: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block table and ``seq_lens`` in which each row ``rows[i]`` reads its first ``keep[i]`` pages, then
    its pages from ``skip_to[i]`` on: ``seq_len = keep * page + (s - skip_to * page)`` (new copies)."""
    table, seq_lens = table.clone(), seq_lens.clone()
    if rows.numel() == 0:
        return table, seq_lens
    width = table.shape[1]
    cols = torch.arange(width)[None, :]
    keep, skip_to = keep[:, None], skip_to[:, None]
    src = torch.where(cols < keep, cols, cols + (skip_to - keep))
    s = seq_lens[rows].long()
    used = -(-s // page)
    compact_len = keep[:, 0] * page + s - skip_to[:, 0] * page
    picked = table[rows].gather(1, src.clamp(max=width - 1))
    table[rows] = torch.where(src < used[:, None], picked, torch.zeros_like(picked))
    seq_lens[rows] = compact_len.to(seq_lens.dtype)
    return table, seq_lens


@dataclass
class EvictStep:
    """What the layers of one KV-cache group do for eviction in one step (built once per step by the adapter)."""

    table: torch.Tensor  # vLLM's positional block table (not compacted)
    read: Any = None  # what the layers read in place of the kernel (streaming's window)
    stash: list[tuple[str, int, int]] = field(default_factory=list)  # (request, first token, count)
    compress: list[Any] = field(default_factory=list)  # the requests whose prompt ends in this step


@dataclass
class LayerCall:
    """One layer's attention call, after vLLM's kernel: its query, cache, page layout and output."""

    name: str
    layer: int
    group: int
    query: torch.Tensor  # [tokens, Hq, D]
    kv_cache: torch.Tensor
    maps: tuple[torch.Tensor, torch.Tensor]  # kvlab.vllm.page_layout.page_maps
    scale: float
    output: torch.Tensor  # [tokens, Hq * D], the kernel's


class Ranks:
    """The ranks of one model (tensor parallel) as the worker sees them: one, unless the engine says more."""

    size = 1

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (every rank must call it, in the same order)."""
        return [obj]


def agree_reports(reports: list[dict[str, dict[int, Any]]], agree: Callable[[list[Any]], Any]
                  ) -> dict[str, dict[int, Any]]:
    """One report from every rank's: a request and group that every rank reported, its values agreed with
    ``agree``; a request some rank did not report is left out (logged: its pages stay allocated)."""
    first, out = reports[0], {}
    for req in sorted(set().union(*reports)):
        per_rank = [r.get(req) for r in reports]
        if any(p is None or set(p) != set(first.get(req) or {}) for p in per_rank):
            logger.warning("kvlab: the ranks did not all report request %s: its pages stay allocated", req)
            continue
        out[req] = {group: agree([p[group] for p in per_rank]) for group in per_rank[0]}
    return out


class WorkerState:
    """The worker's eviction records (one per worker process, held by ``kvlab.vllm.engine.KVLabCPUWorker``);
    the method's adapter reads and fills them.

    ``records``: compressed requests and their kept pages per KV-cache group (what decode compacts by);
    ``report``: the same, new this step, for the scheduler (it frees only what was reported); ``stash``:
    observation-window queries that arrived in an earlier prefill chunk; ``pending``: this step's per-layer
    work, finished after the forward. A request that cannot be compressed is served as it is (``failed``,
    logged once): nothing is moved, reported or freed.
    """

    def __init__(self, adapter: Any, runner: Any) -> None:
        self.adapter, self.runner = adapter, runner
        self.method, self.page = adapter.method, adapter.page_size
        self.records: dict[str, dict[int, Any]] = {}  # request -> {group: the adapter's record}
        self.report: dict[str, dict[int, Any]] = {}
        self.stash: dict[tuple[str, str], torch.Tensor] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.failed: set[str] = set()
        self.ranks = Ranks()  # the engine's (kvlab.vllm.engine) when tensor parallel
        self.num_layers = 0  # attention layers that must score a request before it is compressed
        self.group_of: dict[str, int] = {}  # layer name -> KV-cache group
        # diagnostic (KVLAB_VLLM_RECORD=1, tests): every compression's kept positions, by prompt length
        self.kept_log: list[dict[str, Any]] | None = [] if os.environ.get(RECORD_ENV) else None

    def forget(self, req_ids: Any) -> None:
        """Drop a finished, preempted or resumed request (a resumed one is prefilled and compressed again)."""
        for req in req_ids or ():
            self.records.pop(req, None)
            self.pending.pop(req, None)
            self.failed.discard(req)
            for key in [k for k in self.stash if k[0] == req]:
                del self.stash[key]

    def fail(self, req: str, why: str) -> None:
        if req not in self.failed:
            self.failed.add(req)
            logger.warning("kvlab: request %s is served without %s (%s)", req, self.method.name, why)
        self.pending.pop(req, None)

    def rows(self, num_reqs: int, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> Rows | None:
        """The step's rows from the model runner's batch (``None`` when the rows are not requests: warm-up)."""
        batch = self.runner.input_batch
        req_ids = batch.req_ids[:num_reqs]
        if len(req_ids) < num_reqs or any(r is None for r in req_ids):
            return None
        prompt = torch.from_numpy(batch.num_prompt_tokens[:num_reqs].copy())
        return Rows.of(req_ids, prompt, seq_lens[:num_reqs], query_start_loc[: num_reqs + 1])

    def plan(self, rows: Rows, table: torch.Tensor, seq_lens: torch.Tensor, group: int
             ) -> tuple[EvictStep | None, torch.Tensor, torch.Tensor]:
        """This step's eviction plan for one KV-cache group (the builder's), and the block table /
        ``seq_lens`` vLLM's kernel reads (compacted rows; the others as vLLM made them)."""
        return self.adapter.plan(self, rows, table, seq_lens, group)

    def after_attention(self, step: EvictStep, call: LayerCall) -> None:
        self.adapter.after_attention(self, step, call)

    def after_forward(self) -> None:
        self.adapter.after_forward(self)

    def agree(self) -> None:
        """Replace this step's report by the one every rank agrees on (every rank calls it every step)."""
        if self.ranks.size > 1:
            self.report = agree_reports(self.ranks.gather(self.report), self.adapter.agree)

    def take_report(self) -> dict[str, dict[int, Any]]:
        report, self.report = self.report, {}
        return report
