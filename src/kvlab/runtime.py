"""Running transformers decoders on kvlab's store: the runtime :mod:`kvlab.generation` drives.

Two pieces plug in, both through transformers' public extension points (checked against 5.2):

- :class:`KVLabCache`, a ``Cache`` whose ``update`` appends the new (post-RoPE) keys and values to the
  :class:`~kvlab.cache.store.KVStore` and hands the new tokens through unchanged;
- the attention function ``"kvlab"``, registered with ``AttentionInterface``, which ignores the K/V it
  is given and attends over the store instead, reading what the method's plan of the step selects.

The attention function is not handed the cache, so the cache being driven is found through a context
variable set by :func:`running`. Because ``"kvlab"`` has no mask function, transformers builds no
mask: causality, padding and sliding windows come from the positions kept in the store.

Only :func:`kvlab.generation.prefill` and :class:`kvlab.generation.Decoder` drive a :class:`KVLabCache`.
A decode step is the driver's :class:`~kvlab.methods.base.StepPlan`, set on the cache as ``plan`` before
the model runs (no plan: prefill). The driver passes ``cache_position`` to the model, so transformers
never asks the cache for its length, and a layer's step is: a fixed-shape slot write
(:meth:`~kvlab.cache.store.LayerStore.append_decode`), the method's read of the layer as the plan says
(:meth:`~kvlab.methods.base.Method.decode_plan`), the attention on the plan's kernels -- device work only.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from kvlab.attention import ReadPlan, attend
from kvlab.cache.store import WINDOW_SLACK, KVStore
from kvlab.methods.base import Method, StepPlan

ATTENTION_NAME = "kvlab"
_ACTIVE: contextvars.ContextVar[KVLabCache] = contextvars.ContextVar("kvlab_cache")


class KVLabCache(Cache):
    """A transformers ``Cache`` backed by a :class:`KVStore` and driven by a :class:`Method`."""

    def __init__(self, store: KVStore, method: Method | None = None, observe: int = 0,
                 observe_decode: bool = False):
        super().__init__(layers=[])
        self.store = store
        self.method = method
        self.observe = observe  # keep the last `observe` queries of each layer (prefill)
        self.observe_decode = observe_decode
        self.plan: StepPlan | None = None  # the decode step being run (set by the driver; None: prefill)
        self.q_positions: torch.Tensor | None = None  # [B, L]
        self.valid: torch.Tensor | None = None  # [B, L]
        self.queries: dict[int, torch.Tensor] = {}
        self.reads: dict[int, ReadPlan | None] = {}  # what each layer read at the last step

    def set_inputs(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        self.q_positions, self.valid = positions, valid

    # -- the transformers Cache surface the decoders use
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.store.layers[layer_idx]
        if self.plan is not None and key_states.shape[2] == 1:
            layer.append_decode(key_states, value_states, self.q_positions)
        else:
            layer.append(key_states, value_states, self.q_positions, self.valid)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.store.layers[layer_idx].max_length  # the host copy: no device read

    @property
    def is_initialized(self) -> bool:
        return True

    def __len__(self) -> int:
        return self.store.num_layers

    # -- called by the attention function
    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        layer = self.store.layers[layer_idx]
        if self.plan is None:  # prefill
            if self.observe:
                self.queries[layer_idx] = query[:, :, -self.observe:].detach().clone()
            out = attend(layer, query, self.q_positions, scaling)
            layer.trim_window(WINDOW_SLACK)  # give the memory back; decode trims in place before a step
            return out
        if self.observe_decode:
            self.queries[layer_idx] = query.detach()
        read = None
        if self.method is not None and layer.sliding_window is None:
            read = self.method.decode_plan(layer_idx, layer, query, self.plan)
        self.reads[layer_idx] = read
        return attend(layer, query, self.q_positions, scaling, read, backend=self.plan.backend)


def kvlab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    # ``dropout`` comes before ``scaling`` because kvpress's attention patch passes it positionally.
    cache = _ACTIVE.get(None)
    if cache is None:
        raise RuntimeError("kvlab attention called outside kvlab.runtime.running()")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, scaling), None


AttentionInterface.register(ATTENTION_NAME, kvlab_attention)


@contextmanager
def running(model: Any, cache: KVLabCache) -> Iterator[None]:
    """Within the block, ``model`` attends through kvlab's store held by ``cache``."""
    configs = [model.config] + [getattr(model.config, "text_config", None) or model.config]
    saved = [c._attn_implementation for c in configs]
    token = _ACTIVE.set(cache)
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for c, s in zip(configs, saved, strict=True):
            c._attn_implementation = s
        _ACTIVE.reset(token)
