"""Decode-time eviction inside vLLM: TOVA and H2O hold each request at its post-prefill size while it
decodes (:class:`~kvlab.methods.scorer.HeldScorer` with ``decode_evict``, kvlab's default), as kvlab's own
engine runs them.

- **Prompt end.** Every layer runs the method's own ``score`` and ``keep`` on the prompt (the observation
  window's queries stashed across prefill chunks, as for every scorer): each KV head keeps its ``cap`` best
  tokens, token by token, moved into the request's first ``ceil(cap / page)`` pages.
- **Each decode step**, per layer and request, kvlab attends over exactly the live tokens (in place of
  vLLM's kernel output, as streaming does), then the method's own ``victims`` marks one token per KV head
  dead. Every ``compact_every`` steps (the method's ``maintain_layer``) the live tokens move back into the
  first pages, and the worker reports ``(kept pages, position)``: the scheduler frees the pages between
  them, which nothing reads any more. A request holds about ``(cap + compact_every) / page + 2`` pages
  however long it decodes.

The method's state (H2O's accumulated attention, the cap) lives in one copy of the method per request, and
each step the method runs on a one-layer kvlab store of the request's live tokens, so what decides is kvlab's
own code. The store is gathered from vLLM's pages at the request's first decode step and then kept beside
them (each new token appended, each compaction mirrored): a host copy of the held tokens, ``cap +
compact_every`` per layer and KV head, outside vLLM's pool, in place of a gather of every live token per step
(gathered anew only when full). A resumed (preempted) request is recomputed prompt first (the scheduler ends
that step at the prompt's end), then its outputs are replayed through the same steps, one token at a time.
``decode_evict=false`` runs the scorer once at the prompt's end in whole pages
(:class:`~kvlab.vllm.methods.scorers.ScorerAdapter`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlab.attention.probs import attention_probs
from kvlab.cache.store import KVStore, LayerStore
from kvlab.methods import _scoring as S
from kvlab.methods.base import StepContext
from kvlab.methods.scorer import HeldScorer, prompt_store
from kvlab.vllm import page_layout
from kvlab.vllm.eviction import EvictStep, LayerCall, WorkerState
from kvlab.vllm.methods.base import Adapter, adapter
from kvlab.vllm.methods.kv_compress import CompressRow
from kvlab.vllm.methods.scorers import ScorerAdapter


# ---------------------------------------------------------------- one request's live tokens
@dataclass
class HeldLayer:
    """One layer's tokens of a request in kvlab's slot order: where slot ``j`` lives (``slots[j]``, a logical
    index into the request's block-table row: the first pages after a compaction, then each new token at its
    own position, the same for every KV head) and, per KV head, the position of its token there
    (``positions``, -1: dead)."""

    slots: torch.Tensor  # [L]
    positions: torch.Tensor  # [H, L]
    store: LayerStore | None = None  # kvlab's copy of the live tokens, gathered at the first step, then kept
    values: torch.Tensor | None = None  # [H, L, D]: the same tokens' values in slot order

    def append(self, position: int) -> None:
        """A new token, at its own position's slot (vLLM wrote it there)."""
        self.slots = torch.cat([self.slots, torch.tensor([position])])
        self.positions = torch.cat([self.positions, torch.full((self.positions.shape[0], 1), position)], 1)


@dataclass
class Held:
    """A request held at ``cap`` tokens per layer and KV head (the worker's record of it)."""

    method: HeldScorer  # this request's own copy (its per-slot state)
    group: int  # its KV-cache group
    cap: int
    pages: int  # the first pages, which hold the kept tokens
    layers: dict[int, HeldLayer] = field(default_factory=dict)
    base: int = 0  # where the tokens since the last compaction start (the prompt's end at first)
    steps: int = 0  # decode steps done


@dataclass
class HeldRow:
    """A held request's tokens past its prompt in this step (one when decoding; more when replayed)."""

    req_id: str
    computed: int
    seq: int
    query_start: int


def layer_store(kv_cache: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], table_row: torch.Tensor,
                held: HeldLayer, page: int, room: int = 1) -> tuple[LayerStore, torch.Tensor]:
    """A one-layer kvlab store of the live tokens (dead slots kept as dead), with room for ``room`` more; and
    their values ``[H, L, D]`` in its slot order."""
    keys, values = page_layout.gather(kv_cache, maps, table_row[held.slots // page], held.slots % page)
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [H, L, D]
    heads, length, dim = keys.shape
    layer = KVStore.empty(1, 1, heads, dim, block_size=16, dtype=keys.dtype).layers[0]
    layer.reserve(length + room)  # one allocation
    layer.append(keys[None], values[None], torch.arange(length)[None])
    for h in range(heads):
        layer.positions[layer.row_slots(h)] = held.positions[h]
    return layer, values


def full(layer: LayerStore) -> bool:
    """No room for one more token: the store is gathered anew (growing it in place would drop its dead slots)."""
    return any(n >= c * layer.block_size for n, c in zip(layer.lengths_host, layer.capacity_host, strict=True))


def held_step(held: Held, index: int, call: LayerCall, table_row: torch.Tensor, position: int, token: int,
              page: int) -> bool:
    """One decode step of one layer for a held request: compact when due (moving vLLM's pages alike), attend
    the step's query (``call.query[token]``) over the live tokens and the new one (written into
    ``call.output``), and mark each KV head's victim dead. Whether it compacted."""
    method, mine = held.method, held.layers[index]
    if mine.store is None or full(mine.store):  # later steps append the new token, compact as vLLM's pages move
        mine.store, mine.values = layer_store(call.kv_cache, call.maps, table_row, mine, page,
                                              room=method.compact_every + 1)
    layer, values = mine.store, mine.values
    compacted = method.maintain_layer(index, layer)
    if compacted:
        heads, length = mine.positions.shape
        live = mine.positions >= 0
        src = mine.slots.expand(heads, length)[live].view(heads, held.cap)
        page_layout.move_per_head(call.kv_cache, call.maps, table_row, src, page)
        values = values[live].view(heads, held.cap, -1)
        mine.slots = torch.arange(held.cap)
        mine.positions = mine.positions[live].view(heads, held.cap)
    block, offset = table_row[position // page], torch.tensor(position % page)
    key, value = page_layout.gather(call.kv_cache, call.maps, block, offset)  # [H, D]: written by vLLM
    layer.append(key[None, :, None], value[None, :, None], torch.tensor([[position]]))
    mine.append(position)
    values = mine.values = torch.cat([values, value[:, None]], 1)  # [H, T, D]
    query = call.query[token].float()  # [Hq, D]
    hq, dim = query.shape
    q = query.to(layer.keys.dtype)[None, :, None, :]  # [1, Hq, 1, D]
    probs = attention_probs(layer, q, torch.tensor([[position]]), call.scale)  # [1, H, G, 1, T]
    out = torch.einsum("hgt,htd->hgd", probs[0, :, :, 0], values.float()).reshape(hq, dim)
    call.output.view(call.output.shape[0], hq, dim)[token] = out.to(call.output.dtype)
    victim, evict = method.victims(index, layer, StepContext(step=held.steps, positions=torch.tensor([position]),
                                                             queries={index: q}))
    dead = torch.where(evict, -1, mine.positions.gather(1, victim[:, None])[:, 0])
    mine.positions.scatter_(1, victim[:, None], dead[:, None])
    S.mark_dead(layer, victim, evict)
    return compacted


@adapter(HeldScorer)
class HeldScorerAdapter(ScorerAdapter):
    """A scorer that evicts while decoding (TOVA, H2O): the prompt kept token by token, then one victim per
    KV head and step, and the pages behind the last compaction back in vLLM's pool."""

    @classmethod
    def configure(cls, name: str, section: dict[str, Any], page_size: int, heads_apart: bool = True) -> Adapter:
        if section.get("decode_evict") is False:  # once, at the prompt's end, in whole pages
            return ScorerAdapter.configure(name, section, page_size, heads_apart)
        return super().configure(name, section, page_size, heads_apart)

    @classmethod
    def params(cls, section: dict[str, Any], page_size: int) -> dict[str, Any]:
        return {**cls.defaults, **section}  # token by token: no page (the method refuses one)

    # ------------------------------------------------------------ the prompt's end
    def cap(self, n: int) -> int | None:
        """Tokens each layer and KV head of a request with an ``n``-token prompt is held at while it decodes
        (``budget_tokens``, also past a shorter prompt: the request grows to it first; else the budget's share
        of the prompt), or ``None``: served as it is."""
        method = self.method
        if not S.compresses(method) or n <= self.observed():
            return None
        return method.budget_tokens if method.budget_tokens is not None else method.tokens_kept(n)

    def pages(self, n: int) -> int | None:
        """The first pages, which hold the kept tokens."""
        cap = self.cap(n)
        return None if cap is None else -(-cap // self.page_size)

    def prompt_end(self, state: WorkerState, call: LayerCall, row: CompressRow, queries: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, table_row: torch.Tensor) -> None:
        """The method's own score and keep on the prompt; each KV head's kept tokens into the first pages."""
        n, heads = row.n, keys.shape[1]
        pending = state.pending.setdefault(row.req_id, {})
        held = pending.get("held")
        store, ctx = prompt_store(call.layer, keys, values, queries, call.scale)
        layer = store.layers[0]
        if held is None:
            method, cap = copy.deepcopy(self.method), self.cap(n)
            method.hold_at(store, [cap], call.scale)  # as its prepare, with the cap past a shorter prompt
            held = pending["held"] = Held(method=method, group=call.group, cap=cap, pages=self.pages(n), base=n)
        method, count = held.method, min(n, held.cap)
        kept = method.keep(call.layer, layer, method.score(call.layer, layer, ctx), torch.tensor([count]))
        positions = torch.arange(n).expand(heads, n)[kept.view(heads, n)].view(heads, count)
        page_layout.move_per_head(call.kv_cache, call.maps, table_row, positions, self.page_size)
        held.layers[call.layer] = HeldLayer(slots=torch.arange(count), positions=positions.clone())

    # ------------------------------------------------------------ decode
    def read_pages(self, step: EvictStep, record: Any, row: int, req: str, n: int, computed: int, seq: int,
                   query_start: int) -> tuple[int, int]:
        """vLLM's kernel reads only the newest page (its output is replaced); kvlab reads the live tokens."""
        if step.read is None:
            step.read = []
        step.read.append((row, HeldRow(req, computed, seq, query_start)))
        return 0, computed // self.page_size

    def after_attention(self, state: WorkerState, step: EvictStep, call: LayerCall) -> None:
        super().after_attention(state, step, call)
        for row, work in step.read or ():
            held = state.records.get(work.req_id, {}).get(call.group)
            if held is None or work.req_id in state.failed:
                continue
            try:
                table_row = step.table[row]
                for j in range(work.seq - work.computed):
                    if held_step(held, call.layer, call, table_row, work.computed + j, work.query_start + j,
                                 self.page_size):
                        held.base = work.computed + j
                state.pending.setdefault(work.req_id, {})["steps"] = work.seq - work.computed
            except Exception as exc:  # a request's problem must not stop the engine for every client
                state.fail(work.req_id, f"{type(exc).__name__}: {exc}")

    def after_forward(self, state: WorkerState) -> None:
        """Record each request whose prompt ended (every layer kept), count the steps of the others, and report
        what the scheduler may free."""
        pending, state.pending = state.pending, {}
        for req, work in pending.items():
            if req in state.failed:
                continue
            held = work.get("held")
            if held is not None:
                if len(held.layers) != state.num_layers:
                    state.fail(req, f"{len(held.layers)} of {state.num_layers} layers kept its prompt")
                    continue
                state.records[req] = {held.group: held}
            else:
                held = next(iter(state.records.get(req, {}).values()), None)
                if held is None:
                    continue
                held.steps += work.get("steps", 0)
            state.report[req] = {held.group: (held.pages, held.base)}
            if state.kept_log is not None:
                state.kept_log.append({"req": req, "steps": held.steps, "base": held.base,
                                       "kept": {i: lay.positions.tolist() for i, lay in held.layers.items()}})

    def agree(self, reported: list[Any]) -> Any:
        """The most kept pages and the earliest compaction: the pages between are free on every rank."""
        return max(p for p, _ in reported), min(b for _, b in reported)

    def free_range(self, n: int, processed: int, reported: Any) -> tuple[int, int] | None:
        if reported is None:
            return None
        pages, base = reported
        return pages, base // self.page_size
