"""The one attention entry point over the store: a layer's own override, else Triton, else torch.

1. A coded layer (quantized or low-rank K/V) that attends in its own space has ``attend_override``;
2. a decode step (at most :data:`MAX_DECODE_QUERIES` query tokens) over a plain layer on CUDA runs
   kvlab's paged Triton kernel (:mod:`kvlab.kernels.paged_attention`) over the lists of
   :func:`kvlab.attention.reads.read_lists` -- every block, selected blocks of any power-of-two size,
   single tokens, rows of any length;
3. everything else (prefill chunks, the CPU) runs the torch path (:mod:`kvlab.attention.torch_attention`).

Positions are checked in the kernel only when they can hide something (several queries, a sliding
window, or dead slots left by decode-time eviction): a single decode query sees every other stored token.
"""

from __future__ import annotations

import torch

from kvlab.attention.gqa import group_queries, ungroup_output
from kvlab.attention.plans import ReadPlan
from kvlab.attention.reads import read_lists
from kvlab.attention.torch_attention import attend_torch
from kvlab.cache.store import LayerStore
from kvlab.kernels.dispatch import Backend, paged_decode_attention, use_triton

MAX_DECODE_QUERIES = 16  # longer queries (prefill chunks) take the torch path


def attend(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
           plan: ReadPlan | None = None, backend: Backend | None = "auto") -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, L, D]`` (positions ``[B, L]``) over ``layer``, reading what ``plan``
    selects (``None``: everything); returns ``[B, L, Hq, D]``. ``backend``: ``auto``, ``triton``, ``torch``."""
    override = getattr(layer, "attend_override", None)
    if override is not None:
        return override(query, q_positions, scaling, plan, backend)
    b, hq, length, d = query.shape
    if length > MAX_DECODE_QUERIES or type(layer) is not LayerStore or not use_triton(layer.keys.device, backend):
        return attend_torch(layer, query, q_positions, scaling, plan)
    lists = read_lists(layer, plan)
    q = group_queries(query, layer.kv_heads).to(layer.dtype).contiguous()
    use_pos = length > 1 or layer.sliding_window is not None or layer.holes
    out = paged_decode_attention(q, layer.keys, layer.values, lists.table, lists.seq_lens, lists.block_size, scaling,
                                 q_positions.to(q.device) if use_pos else None, layer.positions if use_pos else None,
                                 layer.sliding_window, row_offsets=lists.row_offsets, backend="triton",
                                 max_tokens=lists.max_tokens)
    return ungroup_output(out, hq, length).to(query.dtype)
