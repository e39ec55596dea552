"""``streaming``: StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks", arXiv 2309.17453): keep the first ``n_sink`` tokens and a window of the most
recent tokens, evicting everything in between, after prefill and at every decode step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore
from kvlab.errors import check
from kvlab.methods.base import Method, PrefillContext, StepContext, register


@register
@dataclass
class Streaming(Method):
    """Sinks plus a recent window. The window is ``budget * context - n_sink`` tokens unless ``window`` is set.

    With no budget, ratio, token budget or window (or budget 1), nothing is ever evicted: the full
    budget is the uncompressed cache, as for every kvlab method.
    """

    name: ClassVar[str] = "streaming"
    summary: ClassVar[str] = "StreamingLLM: n_sink first tokens + recent window"

    n_sink: int = 4
    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_sink >= 0, f"n_sink must be >= 0, got {self.n_sink}")
        check(self.window is None or self.window >= 1, f"window must be >= 1 token, got {self.window}")
        self._capacity: torch.Tensor | None = None

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        if self.window is None and self.budget_tokens is None and self.keep_fraction == 1.0:
            self._capacity = None  # full budget: keep everything, during decode too
            return
        if self.window is not None:
            keep = torch.full_like(ctx.context_lengths, self.n_sink + self.window)
        else:
            keep = torch.tensor([self.tokens_kept(int(n)) for n in ctx.context_lengths],
                                device=ctx.context_lengths.device)
            check(bool((keep > self.n_sink).all()),
                  f"budget leaves no room for a window after {self.n_sink} sink tokens; raise the budget")
        # tokens kept per sequence, held through decode, on the device of the row lengths it is compared with
        self._capacity = keep.to(store.layers[0].lengths.device)
        self._evict(store)

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        if self._capacity is not None:
            self._evict(store)

    def _evict(self, store: KVStore) -> None:
        for i in store.compressible_layers():
            layer = store.layers[i]
            cap = self._capacity.repeat_interleave(layer.kv_heads)  # [rows]
            if bool((layer.lengths <= cap).all()):
                continue
            idx = torch.arange(int(layer.lengths.max()), device=layer.lengths.device)[None, :]
            keep = (idx < self.n_sink) | (idx >= (layer.lengths - (cap - self.n_sink))[:, None])
            layer.repack(keep=keep, reserve_tokens=layer.block_size)
