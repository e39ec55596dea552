"""Decode attention over a low-rank cache, in Triton (imports triton; use the dispatcher).

The cache keeps, per slot, rank-``Rv`` latents of the values (``V = a_v @ Bv[h]``) and either full
post-RoPE keys or rank-``Rk`` latents of the *pre-RoPE* keys (``K = RoPE(a_k @ Bk[h], pos)``), the
layouts of Palu (low-rank V, fused reconstruction) and ShadowKV / Loki (pre-RoPE low-rank K). Nothing
is expanded in HBM:

- K: each tile of latents ``[BLOCK_N, Rk]`` is multiplied by the head's basis on chip, both halves of
  ``D`` separately, and rotated there (Hugging Face ``rotate_half`` convention, angles
  ``pos * inv_freq`` from the slot's stored position), then ``s = q1 . k1 + q2 . k2``;
- V: probabilities are accumulated against the latents, ``acc [M, Rv] += p @ a_v``, and projected
  once per split, ``o = (acc / l) @ Bv[h]`` -- ``Rv / D`` of the value bytes and of the multiply-adds.

Grid, tiling, online softmax and the split merge are those of :mod:`kvlab.kernels.paged_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvlab.kernels.paged_attention import (
    BLOCK_N,
    LOG2E,
    dot_in_fp32,
    list_slots,
    merge_splits,
    next_pow2,
    split_plan,
    split_range,
)

K_FULL, K_LOWRANK, K_LOWRANK_ROPE = 0, 1, 2


@triton.jit
def _lowrank_split_kernel(
    q_ptr, k_ptr, kb_ptr, av_ptr, vb_ptr, kpos_ptr, freq_ptr, table_ptr, lens_ptr, offs_ptr, out_ptr, lse_ptr,
    scale_log2, rope_scale, kv_heads, tokens_per_split, M, D, RK, RV,
    stride_qb, stride_qh, stride_qm,
    stride_k, stride_kbh, stride_kbr, stride_av, stride_vbh, stride_vbr, stride_table,
    stride_ob, stride_oh, stride_os, stride_om,
    stride_lr, stride_ls,
    LOG2_BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr,
    K_MODE: tl.constexpr, HAS_OFFSETS: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // kv_heads
    h = row % kv_heads
    half = D // 2
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_rk = tl.arange(0, BLOCK_RK)
    offs_rv = tl.arange(0, BLOCK_RV)
    m_mask = offs_m < M
    h_mask = offs_h < half
    rk_mask = offs_rk < RK
    rv_mask = offs_rv < RV

    # The query in two halves of D (the halves RoPE rotates against each other).
    q_base = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    qh_mask = m_mask[:, None] & h_mask[None, :]
    q1 = tl.load(q_base + offs_h[None, :], mask=qh_mask, other=0.0)
    q2 = tl.load(q_base + half + offs_h[None, :], mask=qh_mask, other=0.0)
    if DOT_FP32:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
    if K_MODE != 0:
        kb_base = kb_ptr + h * stride_kbh + offs_rk[:, None] * stride_kbr
        kb_mask = rk_mask[:, None] & h_mask[None, :]
        kb1 = tl.load(kb_base + offs_h[None, :], mask=kb_mask, other=0.0)
        kb2 = tl.load(kb_base + half + offs_h[None, :], mask=kb_mask, other=0.0)
        if DOT_FP32:
            kb1 = kb1.to(tl.float32)
            kb2 = kb2.to(tl.float32)
    if K_MODE == 2:
        inv_freq = tl.load(freq_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)

    start, end, row_offset = split_range(lens_ptr, offs_ptr, row, split, tokens_per_split, HAS_OFFSETS)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_RV], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n
        t_mask = t < end
        slot = list_slots(table_ptr, row, stride_table, t, t_mask, row_offset, LOG2_BS)
        if K_MODE == 0:
            k_mask = t_mask[:, None] & h_mask[None, :]
            k1 = tl.load(k_ptr + slot[:, None] * stride_k + offs_h[None, :], mask=k_mask, other=0.0)
            k2 = tl.load(k_ptr + slot[:, None] * stride_k + half + offs_h[None, :], mask=k_mask, other=0.0)
            if DOT_FP32:
                k1 = k1.to(tl.float32)
                k2 = k2.to(tl.float32)
        else:
            a_k = tl.load(k_ptr + slot[:, None] * stride_k + offs_rk[None, :],
                          mask=t_mask[:, None] & rk_mask[None, :], other=0.0)
            if DOT_FP32:
                a_k = a_k.to(tl.float32)
            if IEEE:
                k1 = tl.dot(a_k, kb1, input_precision="ieee")
                k2 = tl.dot(a_k, kb2, input_precision="ieee")
            else:
                k1 = tl.dot(a_k, kb1)
                k2 = tl.dot(a_k, kb2)
            if K_MODE == 2:
                pos = tl.load(kpos_ptr + slot, mask=t_mask, other=0).to(tl.float32)
                ang = pos[:, None] * inv_freq[None, :]
                cos = tl.cos(ang) * rope_scale
                sin = tl.sin(ang) * rope_scale
                k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
            k1 = k1.to(q1.dtype)
            k2 = k2.to(q1.dtype)
        if IEEE:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
        else:
            s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        s = tl.where(m_mask[:, None] & t_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        a_v = tl.load(av_ptr + slot[:, None] * stride_av + offs_rv[None, :],
                      mask=t_mask[:, None] & rv_mask[None, :], other=0.0)
        if DOT_FP32:
            a_v = a_v.to(tl.float32)
        if IEEE:
            pv = tl.dot(p.to(a_v.dtype), a_v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(a_v.dtype), a_v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # Project the rank-Rv accumulator to D once: o = (acc / l) @ Bv[h].
    vb = tl.load(vb_ptr + h * stride_vbh + offs_rv[:, None] * stride_vbr + offs_d[None, :],
                 mask=rv_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        vb = vb.to(tl.float32)
    lat = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(vb.dtype)
    if IEEE:
        o = tl.dot(lat, vb, input_precision="ieee")
    else:
        o = tl.dot(lat, vb)
    out_offs = b * stride_ob + h * stride_oh + split * stride_os + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < D))
    if WRITE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + row * stride_lr + split * stride_ls + offs_m, lse, mask=m_mask)


def lowrank_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_latent: torch.Tensor, v_basis: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                             k_basis: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
                             inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0,
                             row_offsets: torch.Tensor | None = None, num_splits: int | None = None,
                             max_tokens: int | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of ``q [B, H_kv, M, D]`` over a low-rank cache; returns ``[B, H_kv, M, D]``.

    ``k_cache``: ``[S, D]`` post-RoPE keys (``k_basis`` None) or ``[S, Rk]`` latents with
    ``k_basis [H_kv, Rk, D]``; with ``inv_freq [D / 2]`` (and ``kv_positions [S]``) the latents are
    pre-RoPE and are rotated on chip. ``v_latent [S, Rv]``, ``v_basis [H_kv, Rv, D]``. Block lists
    (and the optional ``row_offsets``) as in :func:`kvlab.kernels.paged_attention.paged_decode_attention`.
    """
    b, h, m, d = q.shape
    rows = b * h
    assert d % 2 == 0 and block_size & (block_size - 1) == 0
    mode = K_FULL if k_basis is None else (K_LOWRANK_ROPE if inv_freq is not None else K_LOWRANK)
    assert mode != K_LOWRANK_ROPE or kv_positions is not None, "pre-RoPE keys need kv_positions"
    table = block_table.to(device=q.device, dtype=torch.int32).contiguous()
    lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    if max_tokens is None:
        max_tokens = int(lens.max()) if rows else 0
    splits, per_split = split_plan(rows, max_tokens, q.device, num_splits)
    if out is None:
        out = torch.empty_like(q)
    kb = k_basis if k_basis is not None else v_basis
    rk = k_basis.shape[1] if k_basis is not None else 1
    rv = v_basis.shape[1]
    kpos = kv_positions if kv_positions is not None else lens
    offsets = row_offsets.to(device=q.device, dtype=torch.int64).contiguous() if row_offsets is not None else lens
    freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous() if inv_freq is not None else lens
    meta = dict(LOG2_BS=int(math.log2(block_size)), BLOCK_M=next_pow2(m, 16), BLOCK_N=BLOCK_N,
                BLOCK_H=next_pow2(d // 2, 16), BLOCK_D=next_pow2(d, 16), BLOCK_RK=next_pow2(rk, 16),
                BLOCK_RV=next_pow2(rv, 16), K_MODE=mode, HAS_OFFSETS=row_offsets is not None,
                DOT_FP32=dot_in_fp32(q.dtype), IEEE=q.dtype == torch.float32)
    common = (scale * LOG2E, attention_scaling, h, per_split, m, d, rk, rv,
              q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), kb.stride(0), kb.stride(1),
              v_latent.stride(0), v_basis.stride(0), v_basis.stride(1), table.stride(0))
    args = (q, k_cache, kb, v_latent, v_basis, kpos, freq, table, lens, offsets)
    if splits == 1:
        _lowrank_split_kernel[(rows, 1)](*args, out, lens, *common, out.stride(0), out.stride(1), 0, out.stride(2),
                                         0, 0, WRITE_LSE=False, **meta)
        return out
    partial = torch.empty(b, h, splits, m, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(rows, splits, m, device=q.device, dtype=torch.float32)
    _lowrank_split_kernel[(rows, splits)](*args, partial, lse, *common, partial.stride(0), partial.stride(1),
                                          partial.stride(2), partial.stride(3), lse.stride(0), lse.stride(1),
                                          WRITE_LSE=True, **meta)
    return merge_splits(partial, lse, out)
