"""The per-row lists the paged kernel reads, from a layer of the store and a plan (no device sync).

A row of the store is one contiguous run of slots from ``start * block_size``, so every list is given
relative to its row (``row_offsets``): all of the row's blocks (no plan), the plan's logical blocks
(of ``plan.block_size`` tokens, any power of two), or its logical token slots (``block_size = 1``:
every slot is its own block). Widths come from the host: a full read lists the row's whole capacity
(the capacity bucket: it changes only when the layer grows, so the lists of every step of a decode
are the same tensors, and a captured CUDA graph stays valid); the kernel stops at each row's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import LayerStore
from kvlab.kernels.selection import ascending


@dataclass
class ReadLists:
    """What the paged kernel reads from one layer for one plan (see :func:`read_lists`)."""

    table: torch.Tensor  # [R, n] int32 block numbers within each row, ascending, -1 padded
    seq_lens: torch.Tensor  # [R] tokens covered (int32 or int64)
    block_size: int  # tokens per listed block (1 for a plan of tokens)
    row_offsets: torch.Tensor  # [R] int64 first slot of each row in the pools
    max_tokens: int  # an upper bound of seq_lens, known on the host


def full_lists(layer: LayerStore) -> ReadLists:
    """Every block of every row, up to the layer's capacity: the layer's own table
    (:meth:`~kvlab.cache.store.LayerStore.full_block_table`), lengths and row starts, the same tensors for
    every step of a layout (decode appends update the lengths in place)."""
    return ReadLists(layer.full_block_table(), layer.lengths, layer.block_size, layer.row_base,
                     layer.max_capacity_tokens)


def read_lists(layer: LayerStore, plan: ReadPlan | None = None) -> ReadLists:
    """Turn a layer and a plan into the per-row lists the paged kernel reads (see the module docstring)."""
    if plan is None:
        return full_lists(layer)
    rows = layer.rows
    lengths = layer.lengths
    index = plan.index.reshape(rows, -1).to(layer.device).long()
    if not plan.ascending:
        index = ascending(index)
    bs = 1 if plan.kind == "tokens" else (plan.block_size or layer.block_size)
    if plan.kind == "tokens":
        index = torch.where(index < lengths[:, None], index, -1)
    if plan.tokens is not None:
        seq_lens = plan.tokens.reshape(rows).to(layer.device)
    else:
        covered = (lengths[:, None] - index.clamp(min=0) * bs).clamp(0, bs)
        seq_lens = torch.where(index >= 0, covered, 0).sum(-1)
    max_tokens = min(layer.max_capacity_tokens, index.shape[1] * bs)
    return ReadLists(index.int(), seq_lens, bs, layer.row_base, max(max_tokens, 1))

