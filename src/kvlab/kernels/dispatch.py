"""Thin wrappers over kvlab's kernels: Triton on CUDA tensors, the torch reference elsewhere.

Every function takes ``backend``: ``"auto"`` (default: Triton when the tensors are on CUDA and triton
imports, else torch), ``"triton"`` (forced: on CPU tensors this needs ``TRITON_INTERPRET=1``) or
``"torch"``. The environment variable ``KVLAB_KERNELS`` overrides ``auto`` everywhere: ``torch`` turns
Triton off, ``triton`` turns it on (on the CPU under the interpreter, for tests). Triton is imported
only when a Triton kernel is first launched, so ``import kvlab`` works without it. Attention over the
store (plans, read lists, the choice of path) is :func:`kvlab.attention.attend`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from kvlab.errors import KVLabError
from kvlab.kernels import reference, selection

Backend = Literal["auto", "triton", "torch"]


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (``pip install 'kvlab[triton]'``)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device, backend: Backend | None = "auto") -> bool:
    """Resolve ``backend`` for tensors on ``device``."""
    backend = backend or "auto"
    if backend not in ("auto", "triton", "torch"):
        raise KVLabError(f"unknown kernel backend {backend!r}; allowed: auto, triton, torch")
    if backend == "auto":
        backend = {"torch": "torch", "triton": "triton"}.get(os.environ.get("KVLAB_KERNELS", "auto"), "auto")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise KVLabError("the triton backend needs triton: pip install 'kvlab[triton]'")
        if device.type != "cuda" and not _interpreting():
            raise KVLabError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        return True
    return device.type == "cuda" and triton_available()


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


def top_k_blocks(scores: torch.Tensor, block_table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scoring entries of each row of ``block_table`` (``[R, n]``, any ids: physical or
    logical), ascending and -1 padded, and how many were chosen per row (entries scored ``-inf`` never are;
    ties: the lower column first, :func:`kvlab.kernels.selection.top_blocks`)."""
    rows, n = scores.shape
    k = max(1, min(k, n))
    every = torch.full((rows,), n, dtype=torch.long, device=scores.device)
    cols = selection.top_blocks(scores, every, torch.full_like(every, k), k)
    picked = cols.clamp(min=0)
    chosen = (cols >= 0) & (scores.gather(1, picked) > float("-inf"))
    ids = torch.where(chosen, block_table.to(scores.device).long().gather(1, picked), -1)
    return selection.ascending(ids), chosen.sum(-1)


def block_select(q: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, width: int, block_size: int,
                 centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                 kmax: torch.Tensor | None = None, unit: int | None = None, sink_blocks: int = 0,
                 local_blocks: int = 0, backend: Backend | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Block scoring and top-k in one step: see :func:`kvlab.kernels.block_scoring.block_select` (one
    fused Triton kernel on CUDA when the row fits, :func:`kvlab.kernels.reference.block_select_ref`
    elsewhere)."""
    if use_triton(q.device, backend):
        from kvlab.kernels import block_scoring

        columns = -(-(centroids if centroids is not None else kmax).shape[1] * (unit or block_size) // block_size)
        if block_scoring.fits(columns):
            return block_scoring.block_select(q, lengths, k, width, block_size, centroids, kmin, kmax, unit,
                                              sink_blocks, local_blocks)
    return reference.block_select_ref(q, lengths, k, width, block_size, centroids, kmin, kmax, unit, sink_blocks,
                                      local_blocks)


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
