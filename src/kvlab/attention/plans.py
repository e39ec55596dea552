"""What one decode step reads from a layer: a :class:`ReadPlan` per layer, built by a method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ReadPlan:
    """Which part of each row a decode step reads.

    ``index`` is ``[batch, kv_heads, n]``: logical block numbers (``kind="blocks"``) or logical token
    slots (``kind="tokens"``) within each row, padded with -1. Every query head of a GQA group reads
    its KV head's selection. A plan of blocks is read as contiguous runs; a plan of tokens needs a
    token-granular gather. ``block_size`` is the tokens per logical block of a plan of blocks
    (``None``: the store's block size); any power of two works, because a row is contiguous.

    ``ascending``: the builder promises each row's entries ascend with the -1 padding last (the
    routers do), so the read lists need no sort. ``tokens`` (``[batch, kv_heads]``, optional): the
    tokens the plan covers per row, when the builder computed them already.
    """

    kind: Literal["blocks", "tokens"]
    index: torch.Tensor
    block_size: int | None = None
    ascending: bool = False
    tokens: torch.Tensor | None = None

    def token_slots(self, row_lengths: torch.Tensor, block_size: int) -> torch.Tensor:
        """Logical token slots ``[B, H, n_tokens]`` (-1 padded) covered by this plan."""
        if self.kind == "tokens":
            return self.index
        block_size = self.block_size or block_size
        offsets = torch.arange(block_size, device=self.index.device)
        slots = self.index[..., None] * block_size + offsets  # [B, H, n, bs]
        slots = slots.flatten(-2)
        lengths = row_lengths.to(self.index.device).view(*self.index.shape[:2], 1)
        invalid = (self.index[..., None] < 0).expand(*self.index.shape, block_size).flatten(-2) | (slots >= lengths)
        return torch.where(invalid, torch.full_like(slots, -1), slots)
