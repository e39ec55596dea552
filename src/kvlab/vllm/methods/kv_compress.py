"""Eviction at the end of a prompt inside vLLM (:class:`PrefillEviction`), and ``kv-compress`` on it.

KV-Compress (Rehg, 2024, arXiv 2410.00161), as kvlab's ``kv-compress`` with ``rates="uniform"`` or
``"layer"``: in the step that completes a request's prompt, every layer scores the prompt with the last
``window`` prompt queries (stashed across chunked-prefill steps); after the forward the worker picks each
KV head's kept tokens within whole pages (one count per request, or per layer from one sort over layers),
moves them, post-RoPE as they are, into the request's first pages, and reports the counts; the scheduler
frees pages ``[m, n // page)`` only once the report arrives. Decode then reads the compacted block-table
row ``[b_0 .. b_{m-1}, b_{n // page} ..]`` with ``seq_len = m * page + (s - n // page * page)`` through
vLLM's own kernel (:func:`kvlab.vllm.eviction.compact_rows`); new tokens keep their positions.

:class:`PrefillEviction` is that path for any method that scores a prompt once: a method overrides
:meth:`~PrefillEviction.observed`, :meth:`~PrefillEviction.pages`, :meth:`~PrefillEviction.scores` and,
where the layers keep different counts, :meth:`~PrefillEviction.layer_pages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods._paged import keep_per_head, kept_full_pages
from kvlab.methods.kv_compress import (
    KVCompress,
    paged_scores,
    pages_per_layer,
    pool_metric,
    window_metric,
)
from kvlab.vllm import page_layout
from kvlab.vllm.eviction import EvictStep, LayerCall, Rows, WorkerState, compact_rows
from kvlab.vllm.methods.base import EVICTS, Adapter, adapter, budget_given

VLLM_RATES = ("uniform", "layer")


# ---------------------------------------------------------------- kv-compress's rules
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


# ---------------------------------------------------------------- the prefill-end path
@dataclass
class CompressRow:
    """A request whose prompt ends in this step (every layer scores it)."""

    req_id: str
    row: int
    n: int
    computed: int
    query_start: int


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


class PrefillEviction(Adapter):
    """Score each prompt once at its end, keep each KV head's best tokens within whole pages, move them into
    the request's first pages and free the rest (kvlab's worker and scheduler)."""

    role = EVICTS

    # ------------------------------------------------------------ what a method answers
    def observed(self) -> int:
        """How many of the prompt's last queries every layer scores with (0: none)."""
        raise NotImplementedError

    def pages(self, n: int) -> int | None:
        """Full pages each layer keeps of an ``n``-token prompt (the average when layers differ), or ``None``:
        the request is served as it is (also when the prompt is not longer than :meth:`observed`)."""
        raise NotImplementedError

    def scores(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
               n: int) -> torch.Tensor:
        """Scores ``[H, F]`` of the prompt's full pages ``F = n // page * page`` in one layer (the highest kept,
        ``+inf`` forced) from its last queries ``[w, Hq, D]`` and its keys and values ``[n, H, D]``."""
        raise NotImplementedError

    def layer_pages(self, scores: list[torch.Tensor], n: int) -> list[int]:
        """Full pages each layer keeps, from every layer's :meth:`scores`. Default: :meth:`pages` in each."""
        return [self.pages(n)] * len(scores)

    def prefix_cache_off(self) -> str | None:
        return "rewrites a request's first KV blocks after prefill"

    # ------------------------------------------------------------ the scheduler
    def free_range(self, n: int, processed: int, reported: Any) -> tuple[int, int] | None:
        return None if reported is None else (reported, n // self.page_size)

    # ------------------------------------------------------------ the builder's plan
    def plan(self, state: WorkerState, rows: Rows, table: torch.Tensor, seq_lens: torch.Tensor, group: int
             ) -> tuple[EvictStep | None, torch.Tensor, torch.Tensor]:
        """Compact the compressed requests' rows; stash the window queries of prompts that end later; list
        the prompts that end in this step."""
        step, page, w = EvictStep(table=table), self.page_size, self.observed()
        compact, keep, skip_to = [], [], []
        for r, (req, n, c, s) in enumerate(zip(rows.req_ids, rows.prompt.tolist(), rows.computed.tolist(),
                                               rows.seq.tolist(), strict=True)):
            record = state.records.get(req)
            if record is not None:
                if c >= n and group in record:
                    compact.append(r)
                    read = self.read_pages(step, record[group], r, req, n, c, s, int(rows.query_start[r]))
                    keep.append(read[0])
                    skip_to.append(read[1])
                continue
            if req in state.failed or c >= n or (s <= n - w and s < n):
                continue
            if self.pages(n) is None:
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
                                          torch.tensor(skip_to, dtype=torch.long), page)
        return step, new_table, new_seq

    def read_pages(self, step: EvictStep, record: Any, row: int, req: str, n: int, computed: int, seq: int,
                   query_start: int) -> tuple[int, int]:
        """``(keep, skip_to)`` of a compressed request's row past its prompt (:func:`compact_rows`): its first
        ``record`` pages (the kept tokens), then its pages from the prompt's partial last page on."""
        return record, n // self.page_size

    # ------------------------------------------------------------ per layer, after vLLM's kernel
    def after_attention(self, state: WorkerState, step: EvictStep, call: LayerCall) -> None:
        """Keep the window queries of unfinished prompts; score the prompts that end here."""
        for req, first, count in step.stash:
            q = call.query[first:first + count].clone()
            key = (req, call.name)
            state.stash[key] = torch.cat([state.stash[key], q]) if key in state.stash else q
        w, page = self.observed(), self.page_size
        for row in step.compress:
            if row.req_id in state.failed:
                continue
            try:
                n, c = row.n, row.computed
                earlier = state.stash.pop((row.req_id, call.name), None)
                here = call.query[row.query_start + max(0, n - w - c): row.query_start + n - c]
                queries = here if earlier is None else torch.cat([earlier, here])
                if queries.shape[0] != w:
                    state.fail(row.req_id, f"{queries.shape[0]} of the {w} observation-window queries were seen")
                    continue
                pos = torch.arange(n)
                table_row = step.table[row.row, : -(-n // page)].clone()
                keys, values = page_layout.gather(call.kv_cache, call.maps, table_row[pos // page], pos % page)
                self.prompt_end(state, call, row, queries, keys, values, table_row)
            except Exception as exc:  # a request's problem must not stop the engine for every client
                state.fail(row.req_id, f"{type(exc).__name__}: {exc}")

    def prompt_end(self, state: WorkerState, call: LayerCall, row: CompressRow, queries: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, table_row: torch.Tensor) -> None:
        """One layer's work on a prompt that ends in this step: its scores, pending until every layer's are in
        (:meth:`after_forward` chooses)."""
        scores = self.scores(call.layer, queries, keys, values, call.scale, row.n)
        state.pending.setdefault(row.req_id, {})[call.name] = Pending(call.layer, call.group, scores, call.kv_cache,
                                                                      call.maps, table_row, row.n)

    # ------------------------------------------------------------ after the forward
    def after_forward(self, state: WorkerState) -> None:
        """Choose each pending request's kept tokens, move them into the request's first pages, and record
        and report the kept pages per KV-cache group."""
        pending, state.pending = state.pending, {}
        scored: dict[str, list[Pending]] = {}
        for req, layers in pending.items():
            if req in state.failed:
                continue
            if len(layers) != state.num_layers:
                state.fail(req, f"{len(layers)} of {state.num_layers} layers scored it")
                continue
            scored[req] = sorted(layers.values(), key=lambda p: p.layer)
        every_rank = every_ranks_scores(state, scored)
        for req, items in scored.items():
            n = items[0].n
            scores = every_rank.get(req)
            if scores is None:
                state.fail(req, "another rank could not score it")
                continue
            counts = self.layer_pages(scores, n)
            try:
                keeps = [keep_per_head(p.scores, m, self.page_size) for p, m in zip(items, counts, strict=True)]
            except Exception as exc:
                state.fail(req, f"{type(exc).__name__}: {exc}")
                continue
            record: dict[int, int] = {}
            for p, m, keep in zip(items, counts, keeps, strict=True):
                page_layout.move_per_head(p.kv_cache, p.maps, p.table_row, keep, self.page_size)
                record[p.group] = m
            state.records[req] = record
            state.report[req] = record
            if state.kept_log is not None:
                state.kept_log.append({"n": n, "pages": dict(record),
                                       "kept": {p.layer: keep.tolist() for p, keep in zip(items, keeps, strict=True)}})


def every_ranks_scores(state: WorkerState, scored: dict[str, list[Pending]]) -> dict[str, list[torch.Tensor]]:
    """Each scored request's scores per layer over every rank's KV heads (tensor parallel: each rank scored its
    own), so that page counts that depend on scores are the same on every rank, and those of one rank; only
    the requests every rank scored."""
    mine = {req: [p.scores for p in items] for req, items in scored.items()}
    if state.ranks.size == 1:
        return mine
    every = state.ranks.gather(mine)
    return {req: [torch.cat(heads) for heads in zip(*(r[req] for r in every), strict=True)]
            for req in mine if all(req in r for r in every)}


# ---------------------------------------------------------------- kv-compress
@adapter(KVCompress)
class KVCompressAdapter(PrefillEviction):
    """KV-Compress with one kept length per request (``rates="uniform"``, the default inside vLLM) or per
    layer (``"layer"``): vLLM's block table is per request and KV-cache group and a page holds every KV
    head of a layer, so kept lengths cannot vary per head (docs/vllm.md)."""

    defaults = {"rates": "uniform"}
    fixed = {"interval": None, "max_cache_tokens": None}

    @classmethod
    def params(cls, section: dict[str, Any], page_size: int) -> dict[str, Any]:
        rates = section.get("rates", cls.defaults["rates"])
        check(rates in VLLM_RATES,
              f"rates={rates!r} cannot run inside vLLM: its block table is per request and KV-cache group and a page "
              f"holds every KV head of a layer, so kept lengths can vary per layer at most; allowed: "
              f"{', '.join(VLLM_RATES)}")
        return super().params(section, page_size)

    def validate(self) -> None:
        check(budget_given(self.method),
              f"{self.method.name} needs a budget: give budget (fraction kept, e.g. 0.25), ratio or budget_tokens")

    def describe(self) -> dict[str, Any]:
        m = self.method
        return {"rates": m.rates, "window": m.window, "protected": m.protected, "n_sink": m.n_sink,
                "pool_kernel": m.pool_kernel, "aggregation": m.aggregation}

    def group_per_layer(self) -> str | None:
        return "rates=layer" if self.method.rates == "layer" else None

    def observed(self) -> int:
        return self.method.window

    def pages(self, n: int) -> int | None:
        return kv_compress_pages(self.method, n, self.page_size)

    def scores(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
               n: int) -> torch.Tensor:
        return window_scores(self.method, queries, keys, scale, self.page_size)

    def layer_pages(self, scores: list[torch.Tensor], n: int) -> list[int]:
        if self.method.rates != "layer":
            return super().layer_pages(scores, n)
        m = self.method
        floor = kept_full_pages(n, 1, self.page_size, m.protected, m.n_sink)
        return pages_per_layer(scores, self.pages(n), floor, self.page_size)
