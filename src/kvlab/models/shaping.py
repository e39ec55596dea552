"""What a model's config and a batch of prompts give kvlab's store: per-layer sliding windows, left-padded
inputs and their positions, an empty store shaped for the model."""

from __future__ import annotations

from typing import Any

import torch

from kvlab.cache.store import KVStore


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
