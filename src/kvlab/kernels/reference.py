"""Torch references of every kvlab kernel: the CPU path, and what the Triton kernels are tested against.

Each function takes exactly the arguments of its Triton twin (see :mod:`kvlab.kernels` for the data
layout) and computes the same thing with plain tensor operations, in fp32, vectorised over rows:

- :func:`paged_decode_attention_ref` -- decode attention over a per-row list of physical blocks;
- :func:`block_scores_ref` -- per-block scores (centroid dot product or the Quest bound), summed
  over the query heads of a GQA group;
- :func:`block_select_ref` -- block-route's step: those scores for every block of each row, then the
  top-k blocks, ascending (the fused kernel's twin, and block-route's torch path);
- :func:`lowrank_decode_attention_ref` -- attention over rank-R latents of V (and of pre-RoPE K).

A query that sees no key at all gets an output of zeros (the kernels do the same).
"""

from __future__ import annotations

import torch

from kvlab.kernels.selection import forced_blocks, rowwise_mv, top_blocks


def list_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
               row_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical slots ``[R, T]`` of the tokens a block list covers, and their validity ``[R, T]``.

    Token ``t`` of row ``r`` (in list order) lives in entry ``t // block_size`` at offset
    ``t % block_size`` (plus ``row_offsets[r]`` slots); it is valid iff ``t < seq_lens[r]``.
    """
    rows = block_table.shape[0]
    t_max = max(int(seq_lens.max()) if rows else 0, 1)
    t = torch.arange(t_max, device=block_table.device)
    entry = (t // block_size).clamp(max=block_table.shape[1] - 1)
    blocks = block_table.long()[:, entry]  # [R, T]
    valid = (t[None, :] < seq_lens.long().to(block_table.device)[:, None]) & (blocks >= 0)
    slots = blocks.clamp(min=0) * block_size + (t % block_size)[None, :]
    if row_offsets is not None:
        slots = slots + row_offsets.long().to(slots.device)[:, None]
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def _visible(valid: torch.Tensor, kv_pos: torch.Tensor | None, q_pos: torch.Tensor | None, q_rows: int,
             window: int | None) -> torch.Tensor:
    """``[B, H, M, T]`` visibility from token validity ``[B, H, T]`` and positions (query row ``m`` has
    position ``q_pos[b, m % L]``)."""
    vis = valid[:, :, None, :].expand(*valid.shape[:2], q_rows, valid.shape[-1])
    if kv_pos is None or q_pos is None:
        return vis
    length = q_pos.shape[1]
    qp = q_pos[:, torch.arange(q_rows, device=q_pos.device) % length]  # [B, M]
    k = kv_pos[:, :, None, :]
    q = qp[:, None, :, None]
    vis = vis & (k >= 0) & (k <= q)
    if window is not None:
        vis = vis & ((q - k) < window)
    return vis


def _softmax_attend(scores: torch.Tensor, vis: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax of ``scores [B,H,M,T]`` times ``values [B,H,T,X]``; rows with nothing visible give 0."""
    scores = scores.masked_fill(~vis, float("-inf"))
    any_visible = vis.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(any_visible, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(any_visible, probs, torch.zeros_like(probs))
    return probs @ values, probs


def paged_decode_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                               q_positions: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None,
                               window: int | None = None, row_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kvlab.kernels.paged_attention.paged_decode_attention`.

    ``q``: ``[B, H_kv, M, D]`` (the ``M = G * L`` query rows of a GQA group; row ``g * L + l``);
    ``k_pool``/``v_pool``: ``[S, D]`` slots; ``block_table``: ``[B * H_kv, n]`` physical block ids;
    ``seq_lens``: ``[B * H_kv]`` tokens covered by each list. Returns ``[B, H_kv, M, D]`` in ``q.dtype``.
    """
    b, h, m, d = q.shape
    slots, valid = list_slots(block_table, seq_lens, block_size, row_offsets)
    t = slots.shape[1]
    k = k_pool[slots].float().view(b, h, t, d)
    v = v_pool[slots].float().view(b, h, t, d)
    kv_pos = kv_positions[slots].view(b, h, t) if kv_positions is not None else None
    vis = _visible(valid.view(b, h, t), kv_pos, q_positions, m, window)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    out, _ = _softmax_attend(scores, vis, v)
    return out.to(q.dtype)


def block_scores_ref(q: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                     centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                     kmax: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`kvlab.kernels.block_scoring.block_scores`.

    Score of a block for a GQA group = sum over the group's query rows of ``q . centroid`` (when
    ``centroids`` is given) or of the Quest upper bound ``sum_d max(q_d * min_d, q_d * max_d)``
    (arXiv 2406.10774; when ``kmin``/``kmax`` are given). ``block_table``: ``[R, n]`` physical block
    ids, the first ``num_blocks[r]`` valid. Returns ``[R, n]`` fp32, ``-inf`` past each row's blocks.
    """
    b, h, m, d = q.shape
    rows, n = block_table.shape
    qf = q.float().reshape(rows, m, d)
    blocks = block_table.long().clamp(min=0)
    valid = torch.arange(n, device=block_table.device)[None, :] < num_blocks.long().to(block_table.device)[:, None]
    if centroids is not None:
        c = centroids.float()[blocks]  # [R, n, D]
        scores = (c * qf.sum(1)[:, None, :]).sum(-1)
    else:
        lo, hi = kmin.float()[blocks], kmax.float()[blocks]  # [R, n, D]
        qe = qf[:, :, None, :]  # [R, M, 1, D]
        scores = torch.maximum(qe * lo[:, None], qe * hi[:, None]).sum(-1).sum(1)
    return scores.masked_fill(~valid, float("-inf"))


def row_block_scores(q: torch.Tensor, lengths: torch.Tensor, block_size: int, centroids: torch.Tensor | None = None,
                     kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                     unit: int | None = None) -> torch.Tensor:
    """Scores ``[rows, blocks]`` of every block of each row, from per-row summaries ``[rows, units, D]`` of
    ``unit``-token scoring units: a block scores the max over its units that hold a token of the group's
    summed ``q . centroid`` or Quest bound; ``-inf`` past the row's end (``lengths``, ``[rows]``)."""
    b, h, m, d = q.shape
    rows = b * h
    unit = unit or block_size
    r = block_size // unit
    qf = q.float().reshape(rows, m, d)
    lengths = lengths.to(q.device).long()
    if centroids is not None:
        s = rowwise_mv(centroids, qf.sum(1))
    else:
        s = rowwise_mv(kmax, qf.clamp(min=0).sum(1)) + rowwise_mv(kmin, qf.clamp(max=0).sum(1))
    n_units = s.shape[1]
    filled = torch.arange(n_units, device=s.device)[None, :] * unit < lengths[:, None]
    s = torch.where(filled, s.nan_to_num(nan=-torch.inf), -torch.inf)
    n_cols = -(-n_units // r)
    if r > 1:
        s = torch.nn.functional.pad(s, (0, n_cols * r - n_units), value=-torch.inf).view(rows, n_cols, r).amax(-1)
    return s


def block_select_ref(q: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, width: int, block_size: int,
                     centroids: torch.Tensor | None = None, kmin: torch.Tensor | None = None,
                     kmax: torch.Tensor | None = None, unit: int | None = None, sink_blocks: int = 0,
                     local_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`kvlab.kernels.block_scoring.block_select`, with fixed shapes (no read-back).

    Block ``j`` of a row scores the max over its ``unit``-token scoring units (those holding a token)
    of the group's summed ``q . centroid`` or Quest bound; blocks past the row's end score ``-inf``,
    the first ``sink_blocks`` and the newest ``local_blocks`` ``+inf``. The ``k[row]`` best blocks
    (ties: the lowest block first) are returned ascending, ``[rows, width]`` -1 padded, with the
    tokens they cover ``[rows]``: :func:`row_block_scores`, then
    :func:`~kvlab.kernels.selection.top_blocks` with the sink and newest blocks forced.
    """
    lengths = lengths.to(q.device).long()
    s = row_block_scores(q, lengths, block_size, centroids, kmin, kmax, unit)
    nb = torch.div(lengths + block_size - 1, block_size, rounding_mode="floor")
    index = top_blocks(s, nb, k.long(), width, forced_blocks(nb, s.shape[1], sink_blocks, local_blocks))
    covered = (lengths[:, None] - index.clamp(min=0) * block_size).clamp(0, block_size)
    return index, torch.where(index >= 0, covered, 0).sum(1)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                attention_scaling: float = 1.0) -> torch.Tensor:
    """Rotary embedding in the Hugging Face ``rotate_half`` convention, in fp32.

    ``x``: ``[..., D]``; ``positions``: ``x.shape[:-1]``; ``inv_freq``: ``[D / 2]``.
    """
    ang = positions.float()[..., None] * inv_freq.float()  # [..., D/2]
    cos, sin = ang.cos() * attention_scaling, ang.sin() * attention_scaling
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def lowrank_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_latent: torch.Tensor,
                                 v_basis: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                                 block_size: int, scale: float, k_basis: torch.Tensor | None = None,
                                 kv_positions: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
                                 attention_scaling: float = 1.0, row_offsets: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """Reference of :func:`kvlab.kernels.lowrank_attention.lowrank_decode_attention`.

    Values are cached as latents ``v_latent [S, Rv]`` with a per-KV-head basis ``v_basis [H_kv, Rv, D]``
    (``V = latent @ basis``). Keys are either full post-RoPE keys ``k_cache [S, D]`` (``k_basis``
    None) or latents ``k_cache [S, Rk]`` with ``k_basis [H_kv, Rk, D]``; with ``inv_freq`` the latents
    are pre-RoPE and the rotation at ``kv_positions`` is applied after reconstruction.
    """
    b, h, m, d = q.shape
    slots, valid = list_slots(block_table, seq_lens, block_size, row_offsets)
    t = slots.shape[1]
    if k_basis is None:
        k = k_cache[slots].float().view(b, h, t, d)
    else:
        lat = k_cache[slots].float().view(b, h, t, -1)
        k = lat @ k_basis.float()[None]  # [B, H, T, D]
        if inv_freq is not None:
            k = rope_rotate(k, kv_positions[slots].view(b, h, t), inv_freq, attention_scaling)
    vis = valid.view(b, h, t)[:, :, None, :].expand(b, h, m, t)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    v_lat = v_latent[slots].float().view(b, h, t, -1)
    out_latent, _ = _softmax_attend(scores, vis, v_lat)  # [B, H, M, Rv]
    return (out_latent @ v_basis.float()[None]).to(q.dtype)


def key_summaries(k: torch.Tensor, valid: torch.Tensor, centroid: bool = True, bounds: bool = True
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Centroid, channel-wise min and max (fp32) of groups of keys ``k`` ``[..., u, D]`` over the valid ones
    (``valid`` ``[..., u, 1]``): ``[..., D]`` each, ``None`` where not asked for. A group with no valid key
    has centroid 0, min +inf and max -inf."""
    k = k.float()
    c = torch.where(valid, k, 0.0).sum(-2) / valid.sum(-2).clamp(min=1) if centroid else None
    lo = torch.where(valid, k, torch.inf).amin(-2) if bounds else None
    hi = torch.where(valid, k, -torch.inf).amax(-2) if bounds else None
    return c, lo, hi

