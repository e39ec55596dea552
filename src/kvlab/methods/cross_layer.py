"""``cross-layer``: layers that reuse the K/V of the layer below instead of caching their own (Cross-Layer
Attention, Brandon et al., 2024, arXiv 2405.12981; trained in there, applied **post hoc** here).

A sharing layer's store is replaced by :class:`SharedLayerStore`, a view of the layer below: it holds no
K/V (0 bytes), drops what the model appends to it, and its queries attend over the lower layer's
keys and values -- which, because layers run in order, already include the current token. Sharing
layers are chosen by :func:`sharing_layers` (the memory calculator, ``kvlab memory``, uses it too):
``fraction`` of the layers, spread evenly, each reusing the nearest lower layer of the same kind; or
the explicit ``layers`` list (comma-separated). Only compressible (global) layers share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods.base import Method, PrefillContext, register


def sharing_layers(windows: list[int | None] | int, fraction: float) -> list[int]:
    """Which layers reuse the K/V of the nearest layer below of the same kind (same window, or both global).

    Within each kind, ``fraction`` of its layers share, spread evenly; the lowest layer of a kind never
    shares. ``windows`` is the per-layer window list (or a layer count: all global).
    """
    check(0 <= fraction < 1, f"share fraction must be in [0, 1), got {fraction}")
    if isinstance(windows, int):
        windows = [None] * windows
    shared = []
    for kind in dict.fromkeys(windows):
        idx = [i for i, w in enumerate(windows) if w == kind]
        shared += [i for j, i in enumerate(idx) if j > 0 and math.floor((j + 1) * fraction) > math.floor(j * fraction)]
    return sorted(shared)


class SharedLayerStore:
    """A layer that reads another layer's store and caches nothing itself."""

    def __init__(self, source: LayerStore, source_idx: int):
        self.source, self.source_idx = source, source_idx

    def __getattr__(self, name: str) -> Any:  # reads: the source layer's
        return getattr(self.__dict__["source"], name)

    def append(self, *args: Any, **kwargs: Any) -> None:
        """The layer's own K/V are dropped: the layer below's are used."""

    def append_decode(self, *args: Any, **kwargs: Any) -> None:
        pass

    def advance_host(self, *args: Any, **kwargs: Any) -> None:
        pass

    def ensure_room(self, *args: Any, **kwargs: Any) -> None:
        pass

    def compact(self, *args: Any, **kwargs: Any) -> None:
        pass

    def repack(self, *args: Any, **kwargs: Any) -> None:
        """Eviction happens on the source layer."""

    def reserve(self, *args: Any, **kwargs: Any) -> None:
        pass

    def trim_window(self, slack: int) -> None:
        pass

    def clone(self) -> SharedLayerStore:
        return self  # re-pointed by the store that clones the source

    def tensors(self) -> list[torch.Tensor]:
        return []

    def bytes_allocated(self) -> int:
        return 0

    def bytes_in_use(self) -> int:
        return 0

    def kv_bytes_allocated(self) -> int:
        return 0


@register
@dataclass
class CrossLayer(Method):
    """Post hoc CLA: ``fraction`` of the layers (or ``layers``) reuse the K/V of the layer below."""

    name: ClassVar[str] = "cross-layer"
    summary: ClassVar[str] = "post hoc CLA: chosen layers reuse the K/V of the layer below (0 bytes for them)"
    family: ClassVar[str] = "architectural"

    fraction: float = 0.5
    layers: str | None = None  # e.g. "1,3,5": explicit sharing layers

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.keep_fraction == 1.0 and self.budget_tokens is None,
              "cross-layer is set by fraction or layers: leave budget and ratio unset")
        check(0 <= self.fraction < 1, f"fraction must be in [0, 1), got {self.fraction}")

    def sharing(self, store: KVStore) -> dict[int, int]:
        """``{layer: source layer}``."""
        compressible = store.compressible_layers()
        if self.layers is not None:
            try:
                chosen = sorted({int(x) for x in self.layers.split(",") if x.strip()})
            except ValueError:
                check(False, f"layers takes comma-separated layer numbers, got {self.layers!r}")
            for i in chosen:
                check(i in compressible and compressible.index(i) > 0,
                      f"layer {i} cannot share: it must be a global layer with a global layer below it")
        else:
            chosen = [compressible[j] for j in sharing_layers(len(compressible), self.fraction)]
        out = {}
        for i in chosen:
            below = [j for j in compressible if j < i and j not in out]
            out[i] = below[-1]
        return out

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        for i, src in self.sharing(store).items():
            store.layers[i] = SharedLayerStore(store.layers[src], src)
