"""Running transformers decoders on kvlab's store.

Two pieces plug in, both through transformers' public extension points (checked against 5.2):

- :class:`KVLabCache`, a ``Cache`` whose ``update`` appends the new (post-RoPE) keys and values to the
  :class:`~kvlab.cache.store.KVStore` and hands the new tokens through unchanged;
- the attention function ``"kvlab"``, registered with ``AttentionInterface``, which ignores the K/V it
  is given and attends over the store instead, reading what the active method's plan selects.

The attention function is not handed the cache, so the cache being driven is found through a context
variable set by :func:`running`. Because ``"kvlab"`` has no mask function, transformers builds no
mask: causality, padding and sliding windows come from the positions kept in the store.

Only :func:`kvlab.generation.prefill` and :func:`kvlab.generation.decode` drive a :class:`KVLabCache`
(decode is the only loop that sets ``decoding``). In decode the driver passes ``cache_position`` to
the model, so transformers never asks the cache for its length, and a layer's step is: a fixed-shape
slot write (:meth:`~kvlab.cache.store.LayerStore.append_decode`), the method's per-layer plan, the
attention -- device work only.
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
from kvlab.cache.store import KVStore
from kvlab.methods.base import Method

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
        self.decoding = False  # set by kvlab.generation.decode alone
        self.q_positions: torch.Tensor | None = None  # [B, L]
        self.valid: torch.Tensor | None = None  # [B, L]
        self.queries: dict[int, torch.Tensor] = {}
        self.plans: dict[int, ReadPlan | None] = {}  # what each layer read at the last step
        self.slack = 64

    def set_inputs(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.q_positions, self.valid = positions, valid

    # -- the transformers Cache surface the decoders use
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.store.layers[layer_idx]
        if self.decoding and key_states.shape[2] == 1:
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
        if self.observe and not self.decoding:
            self.queries[layer_idx] = query[:, :, -self.observe:].detach().clone()
        elif self.observe_decode and self.decoding:
            self.queries[layer_idx] = query.detach()
        plan = None
        if self.decoding and self.method is not None and layer.sliding_window is None:
            plan = self.method.decode_plan(layer_idx, layer, query, self.q_positions)
        self.plans[layer_idx] = plan
        out = attend(layer, query, self.q_positions, scaling, plan)
        if not self.decoding:
            layer.trim_window(self.slack)  # prefill: give the memory back; decode trims in place before a step
        return out


def kvlab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    # ``dropout`` comes before ``scaling`` because kvpress's attention patch passes it positionally.
    cache = _ACTIVE.get(None)
    if cache is None:
        raise RuntimeError("kvlab attention called outside kvlab.models.integration.running()")
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


def sliding_windows(config: Any) -> list[int | None]:
    """Per-layer sliding window (None for global layers), as the model's own attention applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if config.model_type == "mistral" and window:
        return [window] * n
    return [None] * n


def left_pad(ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, L]`` left-padded and ``valid [B, L]``."""
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(ids), length, dtype=torch.bool)
    for i, x in enumerate(ids):
        input_ids[i, length - len(x):] = torch.tensor(x, dtype=torch.long)
        valid[i, length - len(x):] = True
    return input_ids, valid


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over the valid tokens of each row (padding gets 0)."""
    return (torch.cumsum(valid.long(), 1) - 1).clamp(min=0)


def new_store(config: Any, batch: int, block_size: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> KVStore:
    """An empty store shaped for ``config``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVStore.empty(
        num_layers=config.num_hidden_layers, batch=batch, kv_heads=config.num_key_value_heads,
        head_dim=head_dim, block_size=block_size, dtype=dtype, device=device, sliding_windows=sliding_windows(config),
    )
