"""Block scoring in Triton: which blocks a decode step should read (imports triton; use the dispatcher).

For every (sequence, KV head) row and every block, a score summed over the ``M = G * L`` query rows
of the GQA group -- the group's queries are summed on chip first, so a tile of block summaries is
read once for the whole group:

- centroid score: ``sum_m q_m . c_b = (sum_m q_m) . c_b``;
- Quest bound (Tang et al., arXiv 2406.10774): ``sum_m sum_d max(q_md * min_bd, q_md * max_bd)
  = (sum_m q_m+) . max_b + (sum_m q_m-) . min_b``, an upper bound of every ``q . k`` in the block.

Two kernels:

- :func:`block_scores` -- scores of listed physical blocks, grid ``(B * H_kv, cdiv(n, 32))`` (the
  kernel benchmark's scoring step, followed there by a torch top-k, ``dispatch.top_k_blocks``);
- :func:`block_select` -- block-route's fused step: score every block of each row *and* pick its
  top-k, writing the ascending read list and the tokens it covers. Grid ``(B * H_kv, tiles)``: each
  program scores a tile of blocks (sink and newest blocks forced to +inf, blocks past the row's end
  -inf) into a scratch row and counts itself done on an atomic; the row's last program then selects
  from the whole row held in registers: an exact radix select on the scores' order-preserving int32
  keys (four 8-bit passes, each a histogram of the candidates' next digit), ties at the threshold
  taken lowest block first, and the chosen blocks compacted in ascending order with a prefix sum.
  So the scoring has the whole chip's bandwidth and the selection costs no second launch, no sort
  and no read-back: its output widths are fixed by the caller (a CUDA graph replays it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.paged_attention import next_pow2

BLOCK_B = 32  # blocks per program of block_scores
SELECT_TILE = 64  # blocks scored per program of block_select
MAX_SELECT_COLUMNS = 16384  # block_select holds a row's scores in registers: at most this many blocks


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


# ------------------------------------------------------------------ fused scoring + top-k
@triton.jit
def _radix_pass(key_u, match, rem, SHIFT: tl.constexpr):
    """One 8-bit pass of the radix select: among ``match``, the digit at ``SHIFT`` of the ``rem``-th
    largest key, and how many candidates have a larger digit."""
    digit = (key_u >> SHIFT) & 255
    bins = tl.arange(0, 512)
    hist = tl.histogram(tl.where(match, 255 - digit, 256), 512)  # bin 255 - d: largest digit first
    cum = tl.cumsum(hist, 0)
    j = tl.min(tl.where((cum >= rem) & (bins < 256), bins, 511), 0)
    above = tl.sum(tl.where(bins < j, hist, 0), 0)
    return 255 - j, above


@triton.jit
def _block_select_kernel(
    q_ptr, a_ptr, b_ptr, len_ptr, k_ptr, score_ptr, done_ptr, table_ptr, seq_ptr,
    kv_heads, M, D, n_cols, n_units, width, sink, local,
    stride_qb, stride_qh, stride_qm, stride_ar, stride_br, stride_score, stride_table,
    BS: tl.constexpr, UNIT: tl.constexpr, R: tl.constexpr, QUEST: tl.constexpr, TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, COLS: tl.constexpr, WIDTH: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    tiles = tl.num_programs(1)
    b = row // kv_heads
    h = row % kv_heads
    length = tl.load(len_ptr + row).to(tl.int32)
    nb = (length + BS - 1) // BS  # blocks holding tokens

    # ---- score this program's tile of blocks (the max over a block's units of its scoring unit)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_base = q_ptr + b * stride_qb + h * stride_qh
    qa = tl.zeros([BLOCK_D], dtype=tl.float32)  # centroid: sum of q; bound: sum of q+ (pairs with max)
    qb = tl.zeros([BLOCK_D], dtype=tl.float32)  # bound: sum of q- (pairs with min)
    for m in range(0, M):
        qm = tl.load(q_base + m * stride_qm + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        if QUEST:
            qa += tl.maximum(qm, 0.0)
            qb += tl.minimum(qm, 0.0)
        else:
            qa += qm
    offs_b = tile * TILE + tl.arange(0, TILE)
    best = tl.full([TILE], float("-inf"), dtype=tl.float32)
    for r in tl.static_range(R):
        unit = offs_b * R + r
        filled = (unit * UNIT < length) & (unit < n_units)
        mask = filled[:, None] & d_mask[None, :]
        a = tl.load(a_ptr + row * stride_ar + unit[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        unit_score = tl.sum(a.to(tl.float32) * qa[None, :], 1)
        if QUEST:
            lo = tl.load(b_ptr + row * stride_br + unit[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
            unit_score += tl.sum(lo.to(tl.float32) * qb[None, :], 1)
        best = tl.maximum(best, tl.where(filled, unit_score, float("-inf")))
    in_row = offs_b < nb
    forced = in_row & ((offs_b < sink) | (offs_b >= nb - local))
    score = tl.where(forced, float("inf"), tl.where(in_row, best, float("-inf")))
    tl.store(score_ptr + row * stride_score + offs_b, score, mask=offs_b < n_cols)

    # ---- the row's last program to finish selects from the whole row
    tl.debug_barrier()
    finished = tl.atomic_add(done_ptr + row, 1, sem="acq_rel", scope="gpu")
    if finished == tiles - 1:
        cols = tl.arange(0, COLS)
        row_scores = tl.load(score_ptr + row * stride_score + cols, mask=cols < n_cols, other=float("-inf"),
                             cache_modifier=".cg")
        valid = cols < nb
        bits = row_scores.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed int32 in the order of the floats
        key_u = key ^ -2147483648  # the same order as unsigned bits: digits for the radix passes
        k = tl.minimum(tl.minimum(tl.load(k_ptr + row).to(tl.int32), nb), width)
        rem = k
        d3, above = _radix_pass(key_u, valid, rem, 24)
        rem -= above
        prefix = d3 << 24
        match = valid & ((key_u >> 24) == (prefix >> 24))
        d2, above = _radix_pass(key_u, match, rem, 16)
        rem -= above
        prefix = prefix | (d2 << 16)
        match = valid & ((key_u >> 16) == (prefix >> 16))
        d1, above = _radix_pass(key_u, match, rem, 8)
        rem -= above
        prefix = prefix | (d1 << 8)
        match = valid & ((key_u >> 8) == (prefix >> 8))
        d0, above = _radix_pass(key_u, match, rem, 0)
        rem -= above
        threshold = (prefix | d0) ^ -2147483648  # the k-th largest key, back in signed order
        greater = valid & (key > threshold)
        equal = valid & (key == threshold)
        chosen = greater | (equal & (tl.cumsum(equal.to(tl.int32), 0) <= rem))
        chosen = chosen & (cols < tl.where(k > 0, COLS, 0))
        slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
        tl.store(table_ptr + row * stride_table + slot, cols, mask=chosen)
        count = tl.sum(chosen.to(tl.int32), 0)
        pad = tl.arange(0, WIDTH)
        tl.store(table_ptr + row * stride_table + pad, tl.full([WIDTH], -1, tl.int32),
                 mask=(pad >= count) & (pad < width))
        tokens = tl.where(chosen, tl.minimum(tl.maximum(length - cols * BS, 0), BS), 0)
        tl.store(seq_ptr + row, tl.sum(tokens, 0))


def fits(columns: int) -> bool:
    """Whether :func:`block_select` can hold a row of ``columns`` blocks in registers."""
    return columns <= MAX_SELECT_COLUMNS


def block_select(q: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, width: int, block_size: int,
                 centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                 kmax: torch.Tensor | None = None, unit: int | None = None, sink_blocks: int = 0,
                 local_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k[row]`` blocks of every row by score, ascending: ``(table [rows, width] int32, -1
    padded; tokens covered [rows] int32)``. One fused launch (see the module docstring).

    ``q``: ``[B, H_kv, M, D]`` grouped queries; summaries ``[rows, units, D]`` per row of ``unit``-token
    scoring units (``unit`` divides ``block_size``; a block's score is the max over its units):
    ``centroids`` for centroid scores, or ``kmin`` and ``kmax`` for the Quest bound. ``lengths``
    ``[rows]``: tokens per row; blocks ``< sink_blocks`` and the newest ``local_blocks`` are always
    chosen. ``width`` fixes the output's shape (a row reads at most ``width`` blocks), so the launch has one
    shape per decode.
    """
    b, h, m, d = q.shape
    assert (centroids is None) != (kmin is None or kmax is None), "give centroids, or kmin and kmax"
    rows = b * h
    unit = unit or block_size
    quest = centroids is None
    first, second = (kmax, kmin) if quest else (centroids, centroids)
    assert first.stride(-1) == 1 and second.stride(-1) == 1 and first.stride(1) == d == second.stride(1)
    n_units = first.shape[1]
    r = block_size // unit
    n_cols = -(-n_units // r)
    assert fits(n_cols), f"block_select holds at most {MAX_SELECT_COLUMNS} blocks per row, got {n_cols}"
    device = q.device
    scores = torch.empty(rows, max(n_cols, 1), dtype=torch.float32, device=device)
    done = torch.zeros(rows, dtype=torch.int32, device=device)
    table = torch.empty(rows, width, dtype=torch.int32, device=device)
    tokens = torch.empty(rows, dtype=torch.int32, device=device)
    lens = lengths.to(device).contiguous()
    counts = k.to(device=device, dtype=torch.int32).contiguous()
    cols = next_pow2(max(n_cols, 1), 16)
    grid = (rows, triton.cdiv(max(n_cols, 1), SELECT_TILE))
    _block_select_kernel[grid](
        q, first, second, lens, counts, scores, done, table, tokens,
        h, m, d, n_cols, n_units, width, sink_blocks, local_blocks,
        q.stride(0), q.stride(1), q.stride(2), first.stride(0), second.stride(0), scores.stride(0), table.stride(0),
        BS=block_size, UNIT=unit, R=r, QUEST=quest, TILE=SELECT_TILE, BLOCK_D=next_pow2(d, 16), COLS=cols,
        WIDTH=next_pow2(max(width, 1), 16), num_warps=max(4, min(16, cols // 512)),
    )
    return table, tokens
