"""``local-global``: interleaved local/global attention (Gemma 3, arXiv 2503.19786: five sliding-window
layers of 1024 tokens per global layer; Gemma 3 270M uses 512), applied **post hoc** to a model trained
with full attention everywhere, to measure what the pattern would cost it.

Every ``(locals_per_global + 1)``-th layer stays global; the others become sliding-window layers of ``window``
tokens: after prefill they keep only the last ``window`` tokens, and from then on the store's own
sliding-window path (mask ``q - k < window`` and trimming) keeps them there. A model that is already
local/global (``gemma3-270m``) is left as it is: its native pattern stands and its global layers stay
global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.cache.store import KVStore
from kvlab.errors import check
from kvlab.methods.base import Method, PrefillContext, register


@register
@dataclass
class LocalGlobal(Method):
    """Post hoc: a sliding window of ``window`` tokens on all but every ``(locals_per_global + 1)``-th layer."""

    name: ClassVar[str] = "local-global"
    summary: ClassVar[str] = "post hoc Gemma-3 pattern: window W on all but every 6th layer (5:1, W=512)"
    family: ClassVar[str] = "architectural"

    locals_per_global: int = 5  # the 5 of Gemma 3's 5:1 (``ratio`` is the base class's fraction removed)
    window: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.keep_fraction == 1.0 and self.budget_tokens is None,
              "local-global is set by locals_per_global and window: leave budget and ratio unset")
        check(self.locals_per_global >= 1,
              f"locals_per_global must be >= 1 local layer per global one, got {self.locals_per_global}")
        check(self.window >= 1, f"window must be >= 1 token, got {self.window}")

    def local_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if (i + 1) % (self.locals_per_global + 1) != 0]

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        compressible = set(store.compressible_layers())
        if len(compressible) < store.num_layers:
            return  # natively local/global (Gemma 3): the model's own pattern stands, its global layers stay global
        for i in self.local_layers(store.num_layers):
            if i not in compressible:
                continue
            layer = store.layers[i]
            layer.sliding_window = self.window
            t = int(layer.lengths.max()) if layer.rows else 0
            if t > self.window:
                keep = torch.arange(t, device=layer.lengths.device)[None, :] >= (layer.lengths[:, None] - self.window)
                layer.repack(keep=keep, reserve_tokens=layer.block_size)
