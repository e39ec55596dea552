"""Block and token selection in plain torch: the pieces every selection shares, once.

The kernels' references, the attention read lists and the routers all speak in per-row lists of block
(or token) numbers, ascending, -1 padded; these build them, with fixed shapes and no read-back:

- :func:`ascending` -- each row's valid entries sorted, the -1 padding last;
- :func:`forced_blocks` -- the sink blocks and the newest local blocks of each row (always read);
- :func:`top_blocks` -- each row's ``k`` best blocks by score, forced ones first, ties to the lowest
  block (the rule of the fused Triton selection, :func:`kvlab.kernels.block_scoring.block_select`);
- :func:`rowwise_mv` -- ``[rows, n, D] · [rows, D]``, the scoring product of block summaries or centroids.
"""

from __future__ import annotations

import torch


def ascending(index: torch.Tensor) -> torch.Tensor:
    """Each row's valid (``>= 0``) entries ascending along the last dim, the -1 padding last (int64, same shape)."""
    big = torch.iinfo(torch.long).max
    index = torch.where(index >= 0, index.long(), big).sort(-1).values
    return torch.where(index == big, -1, index)


def forced_blocks(num_blocks: torch.Tensor, width: int, sink_blocks: int, local_blocks: int,
                  block_size: int = 1) -> torch.Tensor:
    """``[rows, width]`` bool: the first ``sink_blocks`` and the newest ``local_blocks`` of each row's
    ``num_blocks`` blocks (``[rows]``, on its device). With ``block_size > 1`` the columns are tokens, each
    marked with its block."""
    cols = torch.arange(width, device=num_blocks.device)[None, :] // block_size
    return ((cols < sink_blocks) | (cols >= (num_blocks - local_blocks)[:, None])) & (cols < num_blocks[:, None])


def top_blocks(scores: torch.Tensor, num_blocks: torch.Tensor, k: torch.Tensor, width: int,
               forced: torch.Tensor | None = None) -> torch.Tensor:
    """Per row the ``k`` best of its ``num_blocks`` blocks by ``scores`` ``[rows, n]`` (``forced`` ones first;
    ties: the lowest block first), ascending, ``[rows, width]`` -1 padded, on the device of ``scores``.

    ``width`` (host) bounds every ``k``, so the result has one shape whatever the lengths: no read-back.
    """
    device = scores.device
    num_blocks, k = num_blocks.to(device), k.to(device)
    s = scores.float()
    cols = torch.arange(s.shape[1], device=device)[None, :]
    if forced is not None:
        s = torch.where(forced.to(device), torch.inf, s)
    s = torch.where(cols < num_blocks[:, None], s.nan_to_num(nan=-torch.inf), -torch.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :width]
    if order.shape[1] < width:
        order = torch.nn.functional.pad(order, (0, width - order.shape[1]))
    keep = torch.arange(width, device=device)[None, :] < torch.minimum(k, num_blocks)[:, None]
    return ascending(torch.where(keep, order, -1))


def rowwise_mv(mat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """``[rows, n, D] @ [rows, D] -> [rows, n]`` in fp32, one matrix-vector product per row.

    On the CPU ``torch.bmm`` with a single column is several times slower than ``torch.mv``; on a GPU
    one ``bmm`` launch is what is fast.
    """
    if mat.device.type != "cpu":
        return torch.bmm(mat.float(), vec.float()[:, :, None])[:, :, 0]
    out = torch.empty(mat.shape[0], mat.shape[1], dtype=torch.float32)
    for r in range(mat.shape[0]):
        torch.mv(mat[r].float(), vec[r].float(), out=out[r])
    return out
