"""kvlab's eviction on vLLM's paged KV cache: what the scheduler frees, what the worker moves and reads.

Plain PyTorch on vLLM's tensors, no vLLM import (the vLLM classes that use it are in
:mod:`kvlab.vllm.engine` and :mod:`kvlab.vllm.backend`). vLLM's block table is *positional*: token ``p``
of a request lives in entry ``p // page``, a freed entry becomes vLLM's null block and the table never
shrinks, so vLLM's positions, ``seq_lens`` and slot mapping stay right without being touched.

- **streaming** (StreamingLLM, arXiv 2309.17453, as kvlab's ``streaming``): a decode query at position
  ``p`` sees the first ``n_sink`` tokens and ``[p - W, p]``. The scheduler frees the pages between the
  sink pages and the window (:func:`streaming_free_range`, a pure function of the prompt length and the
  committed tokens, so both sides agree without talking); the worker attends over exactly those tokens
  (:func:`streaming_attention`), so kvlab's token-granular method is what runs.
- **kv-compress** (KV-Compress, arXiv 2410.00161, as kvlab's ``kv-compress`` with ``rates="uniform"``
  or ``"layer"``): in the step that completes a request's prompt, every layer scores the prompt with the
  last ``window`` prompt queries (:func:`window_scores`); after the forward the worker picks each KV
  head's kept tokens (one count per request, or per layer from one sort over layers), moves them, post-RoPE
  as they are, into the request's first pages (:meth:`WorkerState.finish_step`), and reports the counts;
  the scheduler frees pages ``[m, n // page)`` only once the report arrives. Decode then reads the
  compacted block-table row ``[b_0 .. b_{m-1}, b_{n // page} ..]`` with ``seq_len = m * page + (s - n //
  page * page)`` through vLLM's own kernel (:func:`compact_rows`); new tokens keep their positions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlab.methods import _scoring as S
from kvlab.methods.kv_compress import (
    KVCompress,
    keep_per_head,
    kept_full_pages,
    paged_scores,
    pages_per_layer,
    pool_metric,
    window_metric,
)
from kvlab.methods.streaming import Streaming
from kvlab.vllm import page_layout

logger = logging.getLogger("vllm.kvlab")
RECORD_ENV = "KVLAB_VLLM_RECORD"


# ---------------------------------------------------------------- rules both sides evaluate alike
def streaming_window(method: Streaming, n: int) -> int:
    """The recent window ``W`` of a request with an ``n``-token prompt (a decode query at ``p`` sees
    ``k < n_sink`` or ``k >= p - W``); 0 when the request is served as it is (a full budget, or a budget
    that leaves no window after the sinks: kvlab's own ``streaming`` refuses those, a server serves them)."""
    if method.window is None and not S.compresses(method):
        return 0
    if method.window is None and method.budget_tokens is not None and method.budget_tokens > n:
        return 0
    return max(0, method.kept_tokens(n) - method.n_sink)


def streaming_free_range(method: Streaming, n: int, processed: int, page: int) -> tuple[int, int]:
    """Pages ``[first, last)`` no present or future query reads once ``processed`` tokens are committed:
    the next query (position ``processed``) sees ``k >= processed - W``. Nothing before the prompt is done."""
    w = streaming_window(method, n)
    if w == 0 or processed < n:
        return 0, 0
    return -(-method.n_sink // page), max(0, processed - w) // page


def kv_compress_pages(method: KVCompress, n: int, page: int) -> int | None:
    """Full pages every layer and KV head keeps of an ``n``-token prompt (``rates="uniform"``; the average
    under ``"layer"``), or ``None``: served as it is (the budget keeps every full page, or the prompt is
    not longer than the observation window)."""
    if not S.compresses(method) or n <= method.window:
        return None
    if method.budget_tokens is not None and method.budget_tokens >= n:
        return None
    m = kept_full_pages(n, method.tokens_kept(n), page, method.protected, method.n_sink)
    return m if m < n // page else None


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
class StreamingRead:
    """The tokens the streaming rows of a step attend over (shared by every layer of a KV-cache group).

    Per streaming row ``i``: ``positions``/``valid`` ``[R, T]`` (the sinks, then ``[c - W, s)``) and where
    they live (``blocks``/``offsets``); per query token ``j`` of those rows: its index in the batch
    (``token``), its row (``row``) and the mask of what it sees (``visible`` ``[Q, T]``)."""

    blocks: torch.Tensor
    offsets: torch.Tensor
    token: torch.Tensor
    row: torch.Tensor
    visible: torch.Tensor


def streaming_plan(rows: Rows, windows: torch.Tensor, n_sink: int, table: torch.Tensor, page: int
                   ) -> tuple[StreamingRead | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The streaming rows of a step: those past their prompt whose query no longer sees everything.

    Returns the read plan and the compaction that makes vLLM's kernel read only their newest pages
    (``rows``, ``keep = 0``, ``skip_to = c // page``): its output for them is replaced by
    :func:`streaming_attention`, and it never touches a freed page.
    """
    c, s = rows.computed, rows.seq
    active = (c >= rows.prompt) & (windows > 0) & (c - windows > n_sink)
    idx = torch.nonzero(active).flatten()
    empty = torch.zeros(0, dtype=torch.long)
    if idx.numel() == 0:
        return None, empty, empty, empty
    c, s, w = c[idx], s[idx], windows[idx]
    q = s - c
    t = torch.arange(n_sink + int((w + q).max()))[None, :]
    pos = torch.where(t < n_sink, t, (c - w)[:, None] + (t - n_sink))
    valid = (t < n_sink) | (pos < s[:, None])
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    blocks = table[idx].long().gather(1, pos // page)
    token_row = torch.repeat_interleave(torch.arange(idx.numel()), q)
    first = torch.repeat_interleave(rows.query_start[idx], q)
    j = torch.arange(token_row.numel()) - torch.repeat_interleave(torch.cumsum(q, 0) - q, q)
    q_pos = (c[token_row] + j)[:, None]
    p = pos[token_row]
    visible = valid[token_row] & (p <= q_pos) & ((t < n_sink) | (p >= q_pos - w[token_row][:, None]))
    read = StreamingRead(blocks=blocks, offsets=pos % page, token=first + j, row=token_row, visible=visible)
    return read, idx, torch.zeros_like(idx), c // page


def streaming_attention(read: StreamingRead, query: torch.Tensor, kv_cache: torch.Tensor,
                        maps: tuple[torch.Tensor, torch.Tensor], scale: float, output: torch.Tensor) -> None:
    """Attention of the streaming query tokens over their sinks and window, written into ``output``
    (``[tokens, Hq * D]``, vLLM's layer output) in place of the kernel's."""
    k, v = page_layout.gather(kv_cache, maps, read.blocks, read.offsets)  # [R, T, H, D]
    heads = k.shape[2]
    q = query[read.token].float()  # [Q, Hq, D]
    nq, hq, d = q.shape
    q = q.view(nq, heads, hq // heads, d)
    k, v = k[read.row].float(), v[read.row].float()  # [Q, T, H, D]
    logits = torch.einsum("qhgd,qthd->qhgt", q, k) * scale
    logits = logits.masked_fill(~read.visible[:, None, None, :], float("-inf"))
    out = torch.einsum("qhgt,qthd->qhgd", torch.softmax(logits, dim=-1), v)
    output.view(output.shape[0], hq, d)[read.token] = out.reshape(nq, hq, d).to(output.dtype)


@dataclass
class CompressRow:
    """A request whose prompt ends in this step (kv-compress scores it at every layer)."""

    req_id: str
    row: int
    n: int
    computed: int
    query_start: int


@dataclass
class EvictStep:
    """What the layers of one KV-cache group do for eviction in one step (built once per step)."""

    table: torch.Tensor  # vLLM's positional block table (not compacted)
    streaming: StreamingRead | None = None
    stash: list[tuple[str, int, int]] = field(default_factory=list)  # (request, first token, count)
    compress: list[CompressRow] = field(default_factory=list)


# ---------------------------------------------------------------- kv-compress scoring
def window_scores(method: KVCompress, queries: torch.Tensor, keys: torch.Tensor, scale: float, page: int
                  ) -> torch.Tensor:
    """KV-Compress's metric of a prompt's full pages ``[H, F]`` (``F = n // page * page``), as kvlab's
    ``kv-compress`` computes it: softmax of the last ``w`` prompt queries ``[w, Hq, D]`` (post-RoPE) over
    the prompt's keys ``[n, H, D]``, squared (``l2``), summed over the queries and each GQA group,
    max-pooled, the protected tokens (last ``protected``, first ``n_sink``) ``+inf``."""
    n, heads, d = keys.shape
    w, hq, _ = queries.shape
    g = hq // heads
    q = queries.view(w, heads, g, d).permute(1, 2, 0, 3).reshape(heads, g * w, d).to(keys.dtype)
    logits = torch.matmul(q, keys.permute(1, 2, 0)).float() * scale  # [H, G * w, n]
    logits = logits.view(heads, g, w, n)
    q_pos = torch.arange(n - w, n)[:, None]
    logits = logits.masked_fill(torch.arange(n)[None, :] > q_pos, float("-inf"))
    metric = pool_metric(window_metric(torch.softmax(logits, dim=-1), method.aggregation), method.pool_kernel)
    return paged_scores(metric[:, : n // page * page], n, method.protected, method.n_sink)


@dataclass
class Pending:
    """One layer's scores of a request, waiting for the other layers (the choice is made after the forward)."""

    layer: int
    group: int
    scores: torch.Tensor
    kv_cache: torch.Tensor
    maps: tuple[torch.Tensor, torch.Tensor]
    table_row: torch.Tensor
    n: int


class WorkerState:
    """The worker's eviction records (one per worker process, held by ``kvlab.vllm.engine.KVLabCPUWorker``).

    ``records``: compressed requests and their kept pages per KV-cache group (what decode compacts by);
    ``report``: the same, new this step, for the scheduler (it frees only what was reported); ``stash``:
    observation-window queries that arrived in an earlier prefill chunk; ``pending``: this step's scores.
    A request that cannot be compressed is served as it is (``failed``, logged once): nothing is moved,
    reported or freed.
    """

    def __init__(self, method: Any, page: int, rates: str, runner: Any) -> None:
        self.method, self.page, self.rates, self.runner = method, page, rates, runner
        self.records: dict[str, dict[int, int]] = {}
        self.report: dict[str, dict[int, int]] = {}
        self.stash: dict[tuple[str, str], torch.Tensor] = {}
        self.pending: dict[str, dict[str, Pending]] = {}
        self.failed: set[str] = set()
        self.windows: dict[str, int] = {}
        self.num_layers = 0  # attention layers kv-compress must score before a request is compressed
        self.group_of: dict[str, int] = {}  # layer name -> KV-cache group
        # diagnostic (KVLAB_VLLM_RECORD=1, tests): every compression's kept positions, by prompt length
        self.kept_log: list[dict[str, Any]] | None = [] if os.environ.get(RECORD_ENV) else None

    def forget(self, req_ids: Any) -> None:
        """Drop a finished, preempted or resumed request (a resumed one is prefilled and compressed again)."""
        for req in req_ids or ():
            self.records.pop(req, None)
            self.pending.pop(req, None)
            self.failed.discard(req)
            self.windows.pop(req, None)
            for key in [k for k in self.stash if k[0] == req]:
                del self.stash[key]

    def fail(self, req: str, why: str) -> None:
        if req not in self.failed:
            self.failed.add(req)
            logger.warning("kvlab: request %s is served without kv-compress (%s)", req, why)
        self.pending.pop(req, None)

    def rows(self, num_reqs: int, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> Rows | None:
        """The step's rows from the model runner's batch (``None`` when the rows are not requests: warm-up)."""
        batch = self.runner.input_batch
        req_ids = batch.req_ids[:num_reqs]
        if len(req_ids) < num_reqs or any(r is None for r in req_ids):
            return None
        prompt = torch.from_numpy(batch.num_prompt_tokens[:num_reqs].copy())
        return Rows.of(req_ids, prompt, seq_lens[:num_reqs], query_start_loc[: num_reqs + 1])

    def window_of(self, req: str, n: int) -> int:
        w = self.windows.get(req)
        if w is None:
            w = self.windows[req] = streaming_window(self.method, n)
        return w

    # ------------------------------------------------------------ the builder's plan
    def plan(self, rows: Rows, table: torch.Tensor, seq_lens: torch.Tensor, group: int
             ) -> tuple[EvictStep | None, torch.Tensor, torch.Tensor]:
        """This step's eviction plan for one KV-cache group, and the block table / ``seq_lens`` vLLM's
        kernel reads (compacted rows; the others as vLLM made them)."""
        if self.method.name == "streaming":
            windows = torch.tensor([self.window_of(r, int(n)) for r, n in zip(rows.req_ids, rows.prompt.tolist(),
                                                                                strict=True)], dtype=torch.long)
            read, idx, keep, skip_to = streaming_plan(rows, windows, self.method.n_sink, table, self.page)
            if read is None:
                return None, table, seq_lens
            new_table, new_seq = compact_rows(table, seq_lens, idx, keep, skip_to, self.page)
            return EvictStep(table=table, streaming=read), new_table, new_seq
        return self._plan_kv_compress(rows, table, seq_lens, group)

    def _plan_kv_compress(self, rows: Rows, table: torch.Tensor, seq_lens: torch.Tensor, group: int
                          ) -> tuple[EvictStep | None, torch.Tensor, torch.Tensor]:
        step = EvictStep(table=table)
        w = self.method.window
        compact, keep, skip_to = [], [], []
        for r, (req, n, c, s) in enumerate(zip(rows.req_ids, rows.prompt.tolist(), rows.computed.tolist(),
                                               rows.seq.tolist(), strict=True)):
            record = self.records.get(req)
            if record is not None:
                if c >= n and group in record:
                    compact.append(r)
                    keep.append(record[group])
                    skip_to.append(n // self.page)
                continue
            if req in self.failed or c >= n or s <= n - w:
                continue
            if kv_compress_pages(self.method, n, self.page) is None:
                continue
            q0 = int(rows.query_start[r])
            if s < n:  # the window starts in this chunk, the prompt ends in a later one
                lo = max(c, n - w)
                step.stash.append((req, q0 + lo - c, s - lo))
            else:
                step.compress.append(CompressRow(req_id=req, row=r, n=n, computed=c, query_start=q0))
        if not compact and not step.stash and not step.compress:
            return None, table, seq_lens
        idx = torch.tensor(compact, dtype=torch.long)
        new_table, new_seq = compact_rows(table, seq_lens, idx, torch.tensor(keep, dtype=torch.long),
                                          torch.tensor(skip_to, dtype=torch.long), self.page)
        return step, new_table, new_seq

    # ------------------------------------------------------------ per layer, after vLLM's kernel
    def after_attention(self, step: EvictStep, layer_name: str, layer: int, group: int, query: torch.Tensor,
                        kv_cache: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], scale: float) -> None:
        """kv-compress: keep the window queries of unfinished prompts; score the prompts that end here."""
        for req, first, count in step.stash:
            q = query[first:first + count].clone()
            key = (req, layer_name)
            self.stash[key] = torch.cat([self.stash[key], q]) if key in self.stash else q
        w = self.method.window
        for row in step.compress:
            if row.req_id in self.failed:
                continue
            try:
                n, c = row.n, row.computed
                earlier = self.stash.pop((row.req_id, layer_name), None)
                here = query[row.query_start + max(0, n - w - c): row.query_start + n - c]
                queries = here if earlier is None else torch.cat([earlier, here])
                if queries.shape[0] != w:
                    self.fail(row.req_id, f"{queries.shape[0]} of the {w} observation-window queries were seen")
                    continue
                pos = torch.arange(n)
                table_row = step.table[row.row, : -(-n // self.page)].clone()
                keys, _ = page_layout.gather(kv_cache, maps, table_row[pos // self.page], pos % self.page)
                scores = window_scores(self.method, queries, keys, scale, self.page)
                self.pending.setdefault(row.req_id, {})[layer_name] = Pending(layer, group, scores, kv_cache, maps,
                                                                                table_row, n)
            except Exception as exc:  # a request's problem must not stop the engine for every client
                self.fail(row.req_id, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ after the forward
    def finish_step(self) -> None:
        """Choose each pending request's kept tokens (one sort over layers for ``rates="layer"``), move them
        into the request's first pages, and record and report the kept pages per KV-cache group."""
        pending, self.pending = self.pending, {}
        for req, layers in pending.items():
            if req in self.failed:
                continue
            if len(layers) != self.num_layers:
                self.fail(req, f"{len(layers)} of {self.num_layers} layers scored it")
                continue
            items = sorted(layers.values(), key=lambda p: p.layer)
            n = items[0].n
            uniform = kv_compress_pages(self.method, n, self.page)
            if self.rates == "layer":
                floor = kept_full_pages(n, 1, self.page, self.method.protected, self.method.n_sink)
                counts = pages_per_layer([p.scores for p in items], uniform, floor, self.page)
            else:
                counts = [uniform] * len(items)
            try:
                keeps = [keep_per_head(p.scores, m, self.page) for p, m in zip(items, counts, strict=True)]
            except Exception as exc:
                self.fail(req, f"{type(exc).__name__}: {exc}")
                continue
            record: dict[int, int] = {}
            for p, m, keep in zip(items, counts, keeps, strict=True):
                page_layout.move_per_head(p.kv_cache, p.maps, p.table_row, keep, self.page)
                record[p.group] = m
            self.records[req] = record
            self.report[req] = record
            if self.kept_log is not None:
                self.kept_log.append({"n": n, "pages": dict(record),
                                      "kept": {p.layer: keep.tolist() for p, keep in zip(items, keeps, strict=True)}})

    def take_report(self) -> dict[str, dict[int, int]]:
        report, self.report = self.report, {}
        return report
