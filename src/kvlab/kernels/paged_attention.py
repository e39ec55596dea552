"""Paged decode attention in Triton, flash-decoding style (imports triton: load through :mod:`kvlab.kernels.dispatch`).

One kernel serves every access pattern kvlab compares: each (sequence, KV head) row gives a list of
physical block ids and the number of tokens the list covers. ``full`` lists all of a row's blocks,
``block-route`` the selected ones, eviction gives rows different lengths, and token-granular
selection is the same kernel with ``block_size = 1`` (every slot is its own block).

Design (FlashDecoding, Dao et al. 2023; the split/merge of FlashInfer's decode kernels):

- grid ``(B * H_kv, num_splits)``: program ``(row, s)`` takes tokens
  ``[s * tokens_per_split, (s + 1) * tokens_per_split)`` of its row's list;
- one program holds all ``M = G * L`` query rows of the GQA group (padded to 16 for ``tl.dot``),
  so every K/V tile is read from HBM once per group, not once per query head;
- tiles of ``BLOCK_N`` tokens: token ``t`` -> entry ``t >> log2(block_size)`` -> slot
  ``block_id * block_size + (t & (block_size - 1))``; K and V rows (``D`` contiguous elements) are
  gathered by slot, so a block of 16 or 64 tokens is one contiguous run and ``block_size = 1`` is a
  gather of single rows;
- online softmax in fp32 (exp2, scale folded with log2 e); each split writes its normalised output
  and log-sum-exp; a second kernel (grid ``(B * H_kv,)``) merges the splits. With one split the first
  kernel writes the final output directly.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_N = 64  # tokens per tile (the low-rank kernel's; the paged kernel's is TUNING["BLOCK_N"])
MIN_TOKENS_PER_SPLIT = 256
# Launch configuration of the paged kernel: the defaults, for head_dim 128, bf16. `kvlab bench gpu` sweeps a
# few configurations on its device (experiments.gpu_tuning) and runs with the fastest inside `tuned(...)`.
TUNING: dict[str, int] = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_ACTIVE: contextvars.ContextVar[dict[str, int]] = contextvars.ContextVar("kvlab_paged_tuning", default=TUNING)


@contextmanager
def tuned(config: dict[str, int]) -> Iterator[None]:
    """Launch the paged kernel with ``config`` (``BLOCK_N``, ``num_warps``, ``num_stages``; missing keys: the
    defaults of :data:`TUNING`) inside the block, wherever it is called from; the defaults again after."""
    token = _ACTIVE.set({**TUNING, **config})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (the CPU interpreter used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The interpreter computes wrong bf16 ``tl.dot`` results: upcast the operands there."""
    return interpreting() and dtype == torch.bfloat16


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def split_plan(rows: int, max_tokens: int, device: torch.device, num_splits: int | None = None,
               block_n: int = BLOCK_N) -> tuple[int, int]:
    """``(num_splits, tokens_per_split)``: about 4 programs per SM, each with at least 256 tokens
    (a multiple of the tile, ``block_n``)."""
    max_tokens = max(max_tokens, 1)
    if num_splits is None:
        sms = multiprocessors(device)
        wanted = max(1, -(-4 * sms // max(rows, 1)))
        num_splits = min(wanted, max(1, -(-max_tokens // MIN_TOKENS_PER_SPLIT)))
    num_splits = max(1, min(num_splits, -(-max_tokens // block_n)))
    per_split = -(-max_tokens // num_splits)
    per_split = -(-per_split // block_n) * block_n
    return -(-max_tokens // per_split), per_split


@triton.jit
def split_range(lens_ptr, offs_ptr, row, split, tokens_per_split, HAS_OFFSETS: tl.constexpr):
    """``(start, end, row_offset)``: this program's part of its row's list, and the slot offset of the row."""
    seq_len = tl.load(lens_ptr + row)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    row_offset = 0
    if HAS_OFFSETS:
        row_offset = tl.load(offs_ptr + row).to(tl.int64)
    return start, end, row_offset


@triton.jit
def list_slots(table_ptr, row, stride_table, t, t_mask, row_offset, LOG2_BS: tl.constexpr):
    """Pool slots of list positions ``t`` of a row: the block from the table, then the offset inside it."""
    block = tl.load(table_ptr + row * stride_table + (t >> LOG2_BS), mask=t_mask, other=0).to(tl.int64)
    return row_offset + (block << LOG2_BS) + (t & ((1 << LOG2_BS) - 1))


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kpos_ptr, qpos_ptr, table_ptr, lens_ptr, offs_ptr, out_ptr, lse_ptr,
    scale_log2, window, kv_heads, q_len, tokens_per_split, M, D,
    stride_qb, stride_qh, stride_qm,
    stride_k, stride_v, stride_table,
    stride_ob, stride_oh, stride_os, stride_om,
    stride_lr, stride_ls,
    LOG2_BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_POS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_OFFSETS: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // kv_heads
    h = row % kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if USE_POS:
        qpos = tl.load(qpos_ptr + b * q_len + offs_m % q_len, mask=m_mask, other=0)

    start, end, row_offset = split_range(lens_ptr, offs_ptr, row, split, tokens_per_split, HAS_OFFSETS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n
        t_mask = t < end
        slot = list_slots(table_ptr, row, stride_table, t, t_mask, row_offset, LOG2_BS)
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_k + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_v + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        visible = m_mask[:, None] & t_mask[None, :]
        if USE_POS:
            kpos = tl.load(kpos_ptr + slot, mask=t_mask, other=-1)
            visible = visible & (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                visible = visible & ((qpos[:, None] - kpos[None, :]) < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offs = b * stride_ob + h * stride_oh + split * stride_os + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + row * stride_lr + split * stride_ls + offs_m, lse, mask=m_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, kv_heads, num_splits, M, D,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_lr, stride_ls,
    stride_ob, stride_oh, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // kv_heads
    h = row % kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    mask = m_mask[:, None] & (offs_d[None, :] < D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(lse_ptr + row * stride_lr + s * stride_ls + offs_m, mask=m_mask, other=float("-inf"))
        part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s * stride_ps + offs_m[:, None] * stride_pm
                       + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * part
        l_i = l_i * alpha + w
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)


def merge_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge ``partial [B, H, S, M, D]`` (fp32, each split normalised) with ``lse [B*H, S, M]`` (log2) into ``out``."""
    b, h, s, m, d = partial.shape
    _merge_splits_kernel[(b * h,)](
        partial, lse, out, h, s, m, d,
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=next_pow2(m, 16), BLOCK_D=next_pow2(d, 16),
    )
    return out


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, block_size: int, scale: float,
                           q_positions: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
                           window: int | None = None, row_offsets: torch.Tensor | None = None,
                           num_splits: int | None = None, max_tokens: int | None = None,
                           out: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """Decode attention of ``q [B, H_kv, M, D]`` over per-row block lists; returns ``[B, H_kv, M, D]``.

    ``k_pool``/``v_pool``: ``[S, D]`` (last dim contiguous); ``block_table``: ``[B * H_kv, n]`` int32
    physical block ids; ``seq_lens``: ``[B * H_kv]`` int32 tokens covered by each list (only the last
    listed block may be partial). ``row_offsets [B * H_kv]`` (optional) is added to every slot of a
    row: with it the table may hold block numbers relative to the row (the store's rows are
    contiguous), in blocks of any power of two. With ``q_positions [B, L]`` and ``kv_positions [S]`` a query row
    ``m`` (position ``q_positions[b, m % L]``) sees a slot iff ``0 <= pos <= q_pos`` (and within
    ``window``). ``max_tokens`` (the longest list) avoids a device sync when given. ``config``: the launch
    configuration (default: the one :func:`tuned` set, else :data:`TUNING`).
    """
    b, h, m, d = q.shape
    rows = b * h
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1 and q.stride(-1) == 1
    table = block_table.to(device=q.device, dtype=torch.int32).contiguous()
    lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    if max_tokens is None:
        max_tokens = int(lens.max()) if rows else 0
    config = config or _ACTIVE.get()
    block_n = config["BLOCK_N"]
    splits, per_split = split_plan(rows, max_tokens, q.device, num_splits, block_n)
    if out is None:
        out = torch.empty_like(q)
    use_pos = q_positions is not None and kv_positions is not None
    qpos = q_positions.to(device=q.device, dtype=torch.int64).contiguous() if use_pos else lens
    kpos = kv_positions if use_pos else lens
    offsets = row_offsets.to(device=q.device, dtype=torch.int64).contiguous() if row_offsets is not None else lens
    block_m, block_d = next_pow2(m, 16), next_pow2(d, 16)
    meta = dict(LOG2_BS=int(math.log2(block_size)), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                USE_POS=use_pos, HAS_WINDOW=use_pos and window is not None, HAS_OFFSETS=row_offsets is not None,
                DOT_FP32=dot_in_fp32(q.dtype), IEEE=q.dtype == torch.float32,
                num_warps=config["num_warps"], num_stages=config["num_stages"])
    length = q_positions.shape[1] if use_pos else 1
    common = (scale * LOG2E, window or 0, h, length, per_split, m, d,
              q.stride(0), q.stride(1), q.stride(2), k_pool.stride(0), v_pool.stride(0), table.stride(0))
    if splits == 1:
        _paged_decode_split_kernel[(rows, 1)](
            q, k_pool, v_pool, kpos, qpos, table, lens, offsets, out, lens, *common,
            out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, WRITE_LSE=False, **meta)
        return out
    partial = torch.empty(b, h, splits, m, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(rows, splits, m, device=q.device, dtype=torch.float32)
    _paged_decode_split_kernel[(rows, splits)](
        q, k_pool, v_pool, kpos, qpos, table, lens, offsets, partial, lse, *common,
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3), lse.stride(0), lse.stride(1),
        WRITE_LSE=True, **meta)
    return merge_splits(partial, lse, out)
