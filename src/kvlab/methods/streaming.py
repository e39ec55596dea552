"""``streaming``: StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks", arXiv 2309.17453): keep the first ``n_sink`` tokens and a window of the most
recent tokens, evicting everything in between, after prefill and at every decode step.

After prefill the evicted tokens are repacked away (the memory goes back). During decode each step
marks the one token that left the window dead, on the device, and every ``compact_every`` steps the
dead slots are compacted away in place, so a step never copies the cache. Memory bound: a row holds
at most ``n_sink + window + compact_every + 1`` slots (rounded up to whole blocks), against
``n_sink + window`` with a repack at every step.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore
from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods.base import Method, PrefillContext, StepContext, register


@register
@dataclass
class Streaming(Method):
    """Sinks plus a recent window. The window is ``budget * context - n_sink`` tokens unless ``window`` is set.

    With no budget, ratio, token budget or window (or budget 1), nothing is ever evicted: the full
    budget is the uncompressed cache, as for every kvlab method. ``compact_every``: decode steps
    between in-place compactions of the slots marked dead (see the module docstring).
    """

    name: ClassVar[str] = "streaming"
    summary: ClassVar[str] = "StreamingLLM: n_sink first tokens + recent window"
    family: ClassVar[str] = "eviction"

    n_sink: int = 4
    window: int | None = None
    compact_every: int = S.COMPACT_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_sink >= 0, f"n_sink must be >= 0, got {self.n_sink}")
        check(self.window is None or self.window >= 1, f"window must be >= 1 token, got {self.window}")
        check(self.compact_every >= 1, f"compact_every must be >= 1 decode step, got {self.compact_every}")
        self._capacity: torch.Tensor | None = None  # [rows] tokens kept per row, on the device
        self._caps: list[int] = []  # the same on the host

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self._capacity = None
        if self.window is None and self.budget_tokens is None and self.keep_fraction == 1.0:
            return  # full budget: keep everything, during decode too
        lengths = [int(n) for n in ctx.context_lengths.tolist()]
        keep = [self.kept_tokens(n) for n in lengths]
        check(all(k > self.n_sink for k in keep),
              f"budget leaves no room for a window after {self.n_sink} sink tokens; raise the budget")
        self._caps = S.rows_of(keep, store.kv_heads)
        self._capacity = torch.tensor(self._caps, dtype=torch.long, device=store.layers[0].device)
        for i in store.compressible_layers():
            layer = store.layers[i]
            if all(n <= c for n, c in zip(layer.lengths_host, self._caps, strict=True)):
                continue
            idx = torch.arange(layer.max_length, device=layer.device)[None, :]
            keep_mask = (idx < self.n_sink) | (idx >= (layer.lengths - (self._capacity - self.n_sink))[:, None])
            layer.repack(keep=keep_mask, reserve_tokens=layer.block_size)

    def kept_tokens(self, context_length: int) -> int:
        """Tokens a sequence of ``context_length`` keeps after prefill: the ``n_sink`` sinks and the window
        (a decode query at position ``p`` then sees ``k < n_sink`` or ``k >= p - (kept - n_sink)``)."""
        if self.window is not None:
            return self.n_sink + self.window
        return self.tokens_kept(context_length)

    def decode_reserve(self, tokens: int) -> int:
        return tokens if self._capacity is None else min(tokens, self.compact_every + 1)

    def plan_step(self, store: KVStore, step: int) -> Hashable:
        if self._capacity is not None:
            for i in store.compressible_layers():
                S.maintain(store.layers[i], self._caps, self.compact_every)
        return None

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        """The token that just left each row's window dies (device work only)."""
        if self._capacity is None:
            return
        for i in store.compressible_layers():
            layer = store.layers[i]
            # a row past its cap holds the sinks, dead slots, then the window: its oldest window token
            # sits `window + 1` slots from the end
            victim = layer.lengths - (self._capacity - self.n_sink) - 1
            S.mark_dead(layer, victim, layer.lengths > self._capacity)

    def decode_end(self, store: KVStore) -> None:
        if self._capacity is not None:
            for i in store.compressible_layers():
                S.maintain(store.layers[i], self._caps, 1)

    def graph_safe(self) -> bool:
        return True
