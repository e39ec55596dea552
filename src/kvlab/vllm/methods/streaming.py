"""``streaming`` inside vLLM: StreamingLLM (Xiao et al., 2023, arXiv 2309.17453), as kvlab's ``streaming``.

A decode query at position ``p`` sees the first ``n_sink`` tokens and ``[p - W, p]``. The scheduler frees
the pages between the sink pages and the window (:func:`streaming_free_range`, a pure function of the
prompt length and the committed tokens, so both sides agree without talking); the worker attends over
exactly those tokens (:func:`streaming_attention`, in place of the kernel's output), so kvlab's
token-granular method is what runs, not a page-rounded one. Prefix caching stays on: a freed block stays
cached until the pool hands it out again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.streaming import Streaming
from kvlab.vllm import page_layout
from kvlab.vllm.eviction import EvictStep, LayerCall, Rows, WorkerState, compact_rows
from kvlab.vllm.methods.base import EVICTS, Adapter, adapter, budget_given


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


# ---------------------------------------------------------------- the worker's read
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


@adapter(Streaming)
class StreamingAdapter(Adapter):
    """Sinks plus a sliding window: vLLM frees the pages between them (kvlab's worker and scheduler)."""

    role = EVICTS
    fixed = {"compact_every": 32}

    def validate(self) -> None:
        check(budget_given(self.method) or self.method.window is not None,
              f"{self.method.name} needs a budget: give budget (fraction kept, e.g. 0.25), ratio or budget_tokens "
              "(or window)")

    def describe(self) -> dict[str, Any]:
        return {"n_sink": self.method.n_sink, "window": self.method.window}

    def free_range(self, n: int, processed: int, reported: Any) -> tuple[int, int] | None:
        return streaming_free_range(self.method, n, processed, self.page_size)

    def plan(self, state: WorkerState, rows: Rows, table: torch.Tensor, seq_lens: torch.Tensor, group: int
             ) -> tuple[EvictStep | None, torch.Tensor, torch.Tensor]:
        windows = torch.tensor([streaming_window(self.method, n) for n in rows.prompt.tolist()], dtype=torch.long)
        read, idx, keep, skip_to = streaming_plan(rows, windows, self.method.n_sink, table, self.page_size)
        if read is None:
            return None, table, seq_lens
        new_table, new_seq = compact_rows(table, seq_lens, idx, keep, skip_to, self.page_size)
        return EvictStep(table=table, read=read), new_table, new_seq

    def after_attention(self, state: WorkerState, step: EvictStep, call: LayerCall) -> None:
        if step.read is not None:
            streaming_attention(step.read, call.query, call.kv_cache, call.maps, call.scale, call.output)
