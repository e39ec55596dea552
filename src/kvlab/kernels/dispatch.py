"""Pick the kernel: Triton on CUDA tensors, the torch reference elsewhere.

Every function takes ``backend``: ``"auto"`` (default: Triton when the tensors are on CUDA and triton
imports, else torch), ``"triton"`` (forced: on CPU tensors this needs ``TRITON_INTERPRET=1``) or
``"torch"``. The environment variable ``KVLAB_KERNELS=torch`` turns Triton off everywhere.

:func:`attend` has the contract of :func:`kvlab.attention.attend` (a layer of the store, a query,
its positions, an optional :class:`~kvlab.attention.plans.ReadPlan`) and turns the store and the
plan into the generic per-row block list the paged kernel reads (:func:`read_lists`). Triton is
imported only when a Triton kernel is first launched, so ``import kvlab`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.attention.torch_attention import attend as torch_attend
from kvlab.attention.torch_attention import group_queries, ungroup_output
from kvlab.cache.store import LayerStore
from kvlab.errors import KVLabError
from kvlab.kernels import reference

Backend = Literal["auto", "triton", "torch"]
MAX_DECODE_QUERIES = 16  # longer queries (prefill chunks) take the torch path


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (``pip install 'kvlab[triton]'``)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def use_triton(device: torch.device, backend: Backend | None = "auto") -> bool:
    """Resolve ``backend`` for tensors on ``device``."""
    backend = backend or "auto"
    if backend not in ("auto", "triton", "torch"):
        raise KVLabError(f"unknown kernel backend {backend!r}; allowed: auto, triton, torch")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise KVLabError("the triton backend needs triton: pip install 'kvlab[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise KVLabError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        return True
    return device.type == "cuda" and triton_available() and os.environ.get("KVLAB_KERNELS", "auto") != "torch"


# ------------------------------------------------------------------ kernels
def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, block_size: int, scale: float,
                           q_positions: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
                           window: int | None = None, row_offsets: torch.Tensor | None = None,
                           backend: Backend | None = "auto", **launch) -> torch.Tensor:
    """See :func:`kvlab.kernels.paged_attention.paged_decode_attention` (``launch``: ``num_splits``,
    ``max_tokens``, ``out``; Triton only)."""
    if use_triton(q.device, backend):
        from kvlab.kernels.paged_attention import paged_decode_attention as kernel

        return kernel(q, k_pool, v_pool, block_table, seq_lens, block_size, scale, q_positions, kv_positions,
                      window, row_offsets, **launch)
    return reference.paged_decode_attention_ref(q, k_pool, v_pool, block_table, seq_lens, block_size, scale,
                                                q_positions, kv_positions, window, row_offsets)


def block_scores(q: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                 centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                 kmax: torch.Tensor | None = None, backend: Backend | None = "auto") -> torch.Tensor:
    """See :func:`kvlab.kernels.block_scoring.block_scores`."""
    if use_triton(q.device, backend):
        from kvlab.kernels.block_scoring import block_scores as kernel

        return kernel(q, block_table, num_blocks, centroids, kmin, kmax)
    return reference.block_scores_ref(q, block_table, num_blocks, centroids, kmin, kmax)


def top_k_blocks(scores: torch.Tensor, block_table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scoring entries of each row of ``block_table`` (``[R, n]``, any ids: physical or
    logical), ascending and -1 padded, and how many were chosen per row (entries scored ``-inf`` never are)."""
    rows, n = scores.shape
    k = max(1, min(k, n))
    values, order = scores.topk(k, dim=-1)
    chosen = block_table.long().gather(1, order)
    keep = values > float("-inf")
    big = torch.iinfo(torch.long).max
    chosen = torch.where(keep, chosen, torch.full_like(chosen, big)).sort(-1).values
    return torch.where(chosen == big, torch.full_like(chosen, -1), chosen), keep.sum(-1)


def select_blocks(q: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor, k: int,
                  centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                  kmax: torch.Tensor | None = None, backend: Backend | None = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the listed blocks of each GQA group and keep the best ``k``: :func:`block_scores`, then
    :func:`top_k_blocks`."""
    scores = block_scores(q, block_table, num_blocks, centroids, kmin, kmax, backend)
    return top_k_blocks(scores, block_table, k)


def lowrank_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_latent: torch.Tensor, v_basis: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                             k_basis: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
                             inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0,
                             row_offsets: torch.Tensor | None = None, backend: Backend | None = "auto",
                             **launch) -> torch.Tensor:
    """See :func:`kvlab.kernels.lowrank_attention.lowrank_decode_attention`."""
    if use_triton(q.device, backend):
        from kvlab.kernels.lowrank_attention import lowrank_decode_attention as kernel

        return kernel(q, k_cache, v_latent, v_basis, block_table, seq_lens, block_size, scale, k_basis,
                      kv_positions, inv_freq, attention_scaling, row_offsets, **launch)
    return reference.lowrank_decode_attention_ref(q, k_cache, v_latent, v_basis, block_table, seq_lens, block_size,
                                                  scale, k_basis, kv_positions, inv_freq, attention_scaling,
                                                  row_offsets)


block_summaries = reference.block_summaries


# ------------------------------------------------------------------ the store
@dataclass
class ReadLists:
    """What the paged kernel reads from one layer for one plan (see :func:`read_lists`)."""

    table: torch.Tensor  # [R, n] int32 block numbers within each row, ascending, -1 padded
    seq_lens: torch.Tensor  # [R] int32 tokens covered
    block_size: int  # tokens per listed block (1 for a plan of tokens)
    row_offsets: torch.Tensor  # [R] int64 first slot of each row in the pools
    max_tokens: int  # an upper bound of seq_lens, known without a device sync


def read_lists(layer: LayerStore, plan: ReadPlan | None = None) -> ReadLists:
    """Turn a layer and a plan into the per-row lists the paged kernel reads.

    A row of the store is one contiguous run of slots from ``start * block_size``, so every list is
    given relative to its row (``row_offsets``): all of the row's blocks (no plan), the plan's
    logical blocks (of ``plan.block_size`` tokens, any power of two), or its logical token slots
    (``block_size = 1``: every slot is its own block).
    """
    device = layer.keys.device
    rows = layer.rows
    offsets = (layer.start * layer.block_size).to(device)
    lengths = layer.lengths.to(device)
    longest = int(layer.lengths.max()) if rows else 0
    big = torch.iinfo(torch.long).max
    if plan is None:
        bs = layer.block_size
        n = max(-(-longest // bs), 1)
        index = torch.arange(n, device=device)[None, :].expand(rows, n)
        table = torch.where(index * bs < lengths[:, None], index, torch.full_like(index, -1))
        return ReadLists(table.int(), lengths.int(), bs, offsets, longest)
    index = plan.index.reshape(rows, -1).to(device).long()
    if plan.kind == "tokens":
        valid = (index >= 0) & (index < lengths[:, None])
        index = torch.where(valid, index, torch.full_like(index, big)).sort(-1).values
        valid = index != big
        table = torch.where(valid, index, torch.full_like(index, -1))
        return ReadLists(table.int(), valid.sum(-1).int(), 1, offsets, min(longest, index.shape[1]))
    bs = plan.block_size or layer.block_size
    index = torch.where(index >= 0, index, torch.full_like(index, big)).sort(-1).values
    valid = index != big
    tokens = (lengths[:, None] - torch.where(valid, index, torch.zeros_like(index)) * bs).clamp(0, bs)
    seq_lens = torch.where(valid, tokens, torch.zeros_like(tokens)).sum(-1)
    table = torch.where(valid, index, torch.full_like(index, -1))
    return ReadLists(table.int(), seq_lens.int(), bs, offsets, min(longest, index.shape[1] * bs))


def attend(layer: LayerStore, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
           plan: ReadPlan | None = None, backend: Backend | None = "auto") -> torch.Tensor:
    """Drop-in for :func:`kvlab.attention.attend`: ``query [B, Hq, L, D]`` -> ``[B, L, Hq, D]``.

    Decode steps (``L <= 16``) on CUDA run the paged Triton kernel over :func:`read_lists`; everything
    else (prefill chunks, the CPU, coded layers -- subclasses of the store that keep K/V encoded and
    may attend in their own space through ``attend_override``) runs the torch path. Positions are
    checked in the kernel only when they can hide something (several queries, or a sliding window):
    a single decode query sees every stored token.
    """
    b, hq, length, d = query.shape
    plain = type(layer) is LayerStore and getattr(layer, "attend_override", None) is None
    if length > MAX_DECODE_QUERIES or not plain or not use_triton(layer.keys.device, backend):
        return torch_attend(layer, query, q_positions, scaling, plan)
    from kvlab.kernels.paged_attention import paged_decode_attention as kernel

    lists = read_lists(layer, plan)
    q = group_queries(query, layer.kv_heads).to(layer.dtype).contiguous()
    use_pos = length > 1 or layer.sliding_window is not None
    out = kernel(q, layer.keys, layer.values, lists.table, lists.seq_lens, lists.block_size, scaling,
                 q_positions.to(q.device) if use_pos else None, layer.positions if use_pos else None,
                 layer.sliding_window, row_offsets=lists.row_offsets, max_tokens=lists.max_tokens)
    return ungroup_output(out, hq, length).to(query.dtype)
