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

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods.base import PrefillContext, StepContext, register
from kvlab.methods.scorer import HeldCache


@register
@dataclass
class Streaming(HeldCache):
    """Sinks plus a recent window. The window is ``budget * context - n_sink`` tokens unless ``window`` is set.

    With no budget, ratio, token budget or window (or budget 1), nothing is ever evicted: the full
    budget is the uncompressed cache, as for every kvlab method. ``compact_every``: decode steps
    between in-place compactions of the slots marked dead (:class:`~kvlab.methods.scorer.HeldCache`).
    """

    name: ClassVar[str] = "streaming"
    summary: ClassVar[str] = "StreamingLLM: n_sink first tokens + recent window"
    family: ClassVar[str] = "eviction"

    n_sink: int = 4
    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_sink >= 0, f"n_sink must be >= 0, got {self.n_sink}")
        check(self.window is None or self.window >= 1, f"window must be >= 1 token, got {self.window}")

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self._capacity = None
        if self.window is None and self.budget_tokens is None and self.keep_fraction == 1.0:
            return  # full budget: keep everything, during decode too
        lengths = [int(n) for n in ctx.context_lengths.tolist()]
        keep = [self.kept_tokens(n) for n in lengths]
        check(all(k > self.n_sink for k in keep),
              f"budget leaves no room for a window after {self.n_sink} sink tokens; raise the budget")
        self.hold(store, keep)
        for i in store.compressible_layers():
            layer = store.layers[i]
            if all(n <= c for n, c in zip(layer.lengths_host, self._caps, strict=True)):
                continue
            idx = torch.arange(layer.max_length, device=layer.device)[None, :]
            keep_mask = (idx < self.n_sink) | (idx >= (layer.lengths - (self._row_caps - self.n_sink))[:, None])
            layer.repack(keep=keep_mask, reserve_tokens=layer.block_size)

    def kept_tokens(self, context_length: int) -> int:
        """Tokens a sequence of ``context_length`` keeps after prefill: the ``n_sink`` sinks and the window
        (a decode query at position ``p`` then sees ``k < n_sink`` or ``k >= p - (kept - n_sink)``)."""
        if self.window is not None:
            return self.n_sink + self.window
        return self.tokens_kept(context_length)

    def victims(self, layer_idx: int, layer: LayerStore, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The token that just left each row's window (device work only): a row past its cap holds the sinks,
        dead slots, then the window, so its oldest window token sits ``window + 1`` slots from the end."""
        return layer.lengths - (self._row_caps - self.n_sink) - 1, layer.lengths > self._row_caps
