"""Block scoring in Triton: which blocks a decode step should read (imports triton; use the dispatcher).

For every (sequence, KV head) row and every block in its list, a score summed over the ``M = G * L``
query rows of the GQA group -- one program reads a tile of block summaries once for the whole group:

- centroid score: ``sum_m q_m . c_b = (sum_m q_m) . c_b`` -- the group's queries are summed on chip
  first, so the tile costs one multiply-add per element;
- Quest bound (Tang et al., arXiv 2406.10774): ``sum_m sum_d max(q_md * min_bd, q_md * max_bd)``,
  an upper bound of every ``q . k`` in the block, from the channel-wise min and max of its keys.

Grid ``(B * H_kv, cdiv(n, BLOCK_B))``; summaries are ``[num_blocks, D]`` pools indexed by physical
block id, like the K/V pools. Top-k then runs on the ``[R, n]`` score matrix (``torch.topk``: the
scores are ``D`` times smaller than the keys, so a fused top-k would save little).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.paged_attention import next_pow2

BLOCK_B = 32  # blocks per program


@triton.jit
def _block_score_kernel(
    q_ptr, c_ptr, lo_ptr, hi_ptr, table_ptr, count_ptr, out_ptr,
    kv_heads, M, D, n_cols,
    stride_qb, stride_qh, stride_qm, stride_c, stride_lo, stride_hi, stride_table, stride_out,
    QUEST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    b = row // kv_heads
    h = row % kv_heads
    offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    count = tl.load(count_ptr + row)
    b_mask = offs_b < count
    block = tl.load(table_ptr + row * stride_table + offs_b, mask=b_mask, other=0).to(tl.int64)
    mask = b_mask[:, None] & d_mask[None, :]
    q_base = q_ptr + b * stride_qb + h * stride_qh
    if QUEST:
        lo = tl.load(lo_ptr + block[:, None] * stride_lo + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + block[:, None] * stride_hi + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        score = tl.zeros([BLOCK_B], dtype=tl.float32)
        for m in range(0, M):
            qm = tl.load(q_base + m * stride_qm + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            score += tl.sum(tl.maximum(qm[None, :] * lo, qm[None, :] * hi), 1)
    else:
        qsum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for m in range(0, M):
            qsum += tl.load(q_base + m * stride_qm + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + block[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        score = tl.sum(c * qsum[None, :], 1)
    score = tl.where(b_mask, score, float("-inf"))
    tl.store(out_ptr + row * stride_out + offs_b, score, mask=offs_b < n_cols)


def block_scores(q: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                 centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                 kmax: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores ``[B * H_kv, n]`` (fp32, ``-inf`` past each row's ``num_blocks``) of the listed blocks.

    ``q``: ``[B, H_kv, M, D]``; ``block_table``: ``[B * H_kv, n]`` physical block ids. Give
    ``centroids [num_blocks, D]`` for centroid scores, or ``kmin``/``kmax`` for the Quest bound.
    """
    b, h, m, d = q.shape
    assert (centroids is None) != (kmin is None or kmax is None), "give centroids, or kmin and kmax"
    table = block_table.to(device=q.device, dtype=torch.int32).contiguous()
    counts = num_blocks.to(device=q.device, dtype=torch.int32).contiguous()
    rows, n = table.shape
    if out is None:
        out = torch.empty(rows, n, device=q.device, dtype=torch.float32)
    quest = centroids is None
    c = centroids if not quest else kmin
    lo, hi = (kmin, kmax) if quest else (centroids, centroids)
    grid = (rows, triton.cdiv(max(n, 1), BLOCK_B))
    _block_score_kernel[grid](
        q, c, lo, hi, table, counts, out, h, m, d, n,
        q.stride(0), q.stride(1), q.stride(2), c.stride(0), lo.stride(0), hi.stride(0), table.stride(0), out.stride(0),
        QUEST=quest, BLOCK_B=BLOCK_B, BLOCK_D=next_pow2(d, 16),
    )
    return out
