"""The paged KV store that every kvlab method works on.

Layout, per layer: one pool of fixed-size blocks for keys and one for values, ``[num_blocks,
block_size, head_dim]``, plus the original position of every slot. Each *row* -- one (sequence, KV
head) pair, ``row = b * kv_heads + h`` -- owns a run of blocks ``[start, start + capacity)`` and uses
its first ``length`` slots; its block table is that run. Rows have their own lengths, so eviction can
remove different numbers of tokens from each head and sequence.

Eviction compacts the survivors of every row into the front of a freshly sized pool and releases the
old one (KV-Compress compacts the same way), so freed memory really goes back to the allocator.
Because each row's blocks stay physically consecutive, a full read of a row is a slice (no copy), a
read of selected blocks is a gather of contiguous block runs, and only token-granular selection
gathers single tokens. When every row has the same capacity, the whole layer is also one dense
``[batch, kv_heads, capacity * block_size, head_dim]`` view, the fast path for uncompressed decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvlab.errors import check


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class LayerStore:
    """Blocks of one layer. See the module docstring for the layout."""

    batch: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    sliding_window: int | None = None
    keys: torch.Tensor = field(init=False)  # [num_blocks * block_size, head_dim]
    values: torch.Tensor = field(init=False)
    positions: torch.Tensor = field(init=False)  # [num_blocks * block_size] int64, -1 where empty
    start: torch.Tensor = field(init=False)  # [rows] first block of each row
    capacity: torch.Tensor = field(init=False)  # [rows] blocks owned by each row
    lengths: torch.Tensor = field(init=False)  # [rows] tokens in use

    def __post_init__(self) -> None:
        rows = self.batch * self.kv_heads
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._allocate(torch.zeros(rows, dtype=torch.long, device=self.device))

    # ----------------------------------------------------------------- layout
    @property
    def rows(self) -> int:
        return self.batch * self.kv_heads

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[0] // self.block_size

    @property
    def uniform(self) -> bool:
        """True when every row owns the same number of blocks, laid out in row order."""
        return bool((self.capacity == self.capacity[0]).all())

    def _allocate(self, capacity_blocks: torch.Tensor) -> None:
        self.capacity = capacity_blocks.clone()
        self.start = torch.cumsum(capacity_blocks, 0) - capacity_blocks
        slots = int(capacity_blocks.sum()) * self.block_size
        self.keys = torch.zeros(slots, self.head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(slots, self.head_dim, dtype=self.dtype, device=self.device)
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=self.device)

    def in_use(self, width: int) -> torch.Tensor:
        """``[rows, width]`` bool on the store's device: logical slot ``j`` of a row holds a token (``j < length``)."""
        return torch.arange(width, device=self.device)[None, :] < self.lengths.to(self.device)[:, None]

    def row_slots(self, row: int) -> slice:
        """Slots of the tokens in use in ``row`` (a slice: the row is contiguous)."""
        first = int(self.start[row]) * self.block_size
        return slice(first, first + int(self.lengths[row]))

    def block_table(self) -> torch.Tensor:
        """``[batch, kv_heads, max_blocks]`` physical block ids of the blocks in use, -1 padded."""
        used = ceil_div_tensor(self.lengths, self.block_size)
        width = max(int(used.max()) if self.rows else 0, 1)
        offsets = torch.arange(width, device=self.device)[None, :]
        table = torch.where(offsets < used[:, None], self.start[:, None] + offsets, -1)
        return table.view(self.batch, self.kv_heads, width)

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[B, H, T, D]`` and positions ``[B, H, T]`` as views (uniform layout only).

        ``T`` is the longest row; slots past a row's length hold position -1.
        """
        assert self.uniform
        cap = int(self.capacity[0]) * self.block_size if self.rows else 0
        t = int(self.lengths.max()) if self.rows else 0
        shape = (self.batch, self.kv_heads, cap)
        k = self.keys.view(*shape, self.head_dim)[:, :, :t]
        v = self.values.view(*shape, self.head_dim)[:, :, :t]
        p = self.positions.view(*shape)[:, :, :t]
        return k, v, p

    def row_view(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[T_row, D]`` and positions ``[T_row]`` of one row (views, no copy)."""
        s = self.row_slots(row)
        return self.keys[s], self.values[s], self.positions[s]

    # ------------------------------------------------------------- mutation
    def reserve(self, tokens_per_row: torch.Tensor | int) -> None:
        """Make room for at least ``tokens_per_row`` more tokens in every row (repacks if needed)."""
        extra = torch.as_tensor(tokens_per_row, dtype=torch.long, device=self.device).expand(self.rows)
        self._ensure_capacity(ceil_div_tensor(self.lengths + extra, self.block_size))

    def _ensure_capacity(self, need_blocks: torch.Tensor) -> None:
        """Grow rows that need more blocks. A uniform layer stays uniform (every row gets the largest
        need), so uncompressed batches keep the one-view dense path; a ragged layer grows per row."""
        if not bool((need_blocks > self.capacity).any()):
            return
        if self.uniform:
            need_blocks = need_blocks.max().expand(self.rows)
        self.repack(keep=None, capacity_blocks=torch.maximum(need_blocks, self.capacity))

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Append new tokens. ``keys``/``values``: ``[B, H, L, D]``; ``positions``/``valid``: ``[B, L]``.

        Tokens where ``valid`` is False (left padding) are not stored.
        """
        batch, heads, new, _ = keys.shape
        check(batch == self.batch and heads == self.kv_heads, "append: batch or KV heads do not match the store")
        if valid is None:
            valid = torch.ones(batch, new, dtype=torch.bool, device=keys.device)
        counts = valid.sum(1).repeat_interleave(heads)  # [rows]
        if bool((ceil_div_tensor(self.lengths + counts, self.block_size) > self.capacity).any()):
            grow = torch.clamp(self.lengths // 4, min=self.block_size)  # amortised growth
            self._ensure_capacity(ceil_div_tensor(self.lengths + counts + grow, self.block_size))
        # Slot of each new valid token: row start + current length + rank among the row's valid tokens.
        rank = torch.cumsum(valid.long(), 1) - 1  # [B, L]
        base = (self.start * self.block_size + self.lengths).view(batch, heads, 1)
        slots = base + rank[:, None, :]  # [B, H, L]
        mask = valid[:, None, :].expand(batch, heads, new)
        slots = slots[mask]
        self.keys[slots] = keys[mask].to(self.dtype)
        self.values[slots] = values[mask].to(self.dtype)
        self.positions[slots] = positions[:, None, :].expand(batch, heads, new)[mask].to(self.positions.device)
        self.lengths += counts

    def repack(self, keep: torch.Tensor | None = None, capacity_blocks: torch.Tensor | None = None,
               reserve_tokens: int = 0) -> None:
        """Compact each row into a freshly sized pool and release the old one.

        ``keep``: ``[rows, T]`` bool over each row's slots (``T`` ≥ the longest row; slots past a row's
        length are ignored), order preserved. ``capacity_blocks``: the new capacity per row; by default
        just enough for the kept tokens plus ``reserve_tokens``.
        """
        old_keys, old_values, old_positions = self.keys, self.values, self.positions
        old_start = self.start
        t = int(self.lengths.max()) if self.rows else 0
        in_use = self.in_use(t)  # [rows, T]
        if keep is not None:
            check(keep.shape[0] == self.rows and keep.shape[1] >= t, "repack: keep mask has the wrong shape")
            in_use = in_use & keep[:, :t].to(in_use.device)
        new_lengths = in_use.sum(1)
        if capacity_blocks is None:
            capacity_blocks = ceil_div_tensor(new_lengths + reserve_tokens, self.block_size)
        self._allocate(capacity_blocks)
        src = (old_start * self.block_size)[:, None] + torch.arange(t, device=self.device)[None, :]
        dst = (self.start * self.block_size)[:, None] + torch.cumsum(in_use.long(), 1) - 1
        src, dst = src[in_use], dst[in_use]
        self.keys[dst] = old_keys[src]
        self.values[dst] = old_values[src]
        self.positions[dst] = old_positions[src]
        self.lengths = new_lengths

    def trim_window(self, slack: int) -> None:
        """Sliding-window layers: drop tokens more than ``window`` behind the newest, once ``slack`` pile up."""
        w = self.sliding_window
        if w is None or int(self.lengths.max()) <= w + slack:
            return
        t = int(self.lengths.max())
        keep = torch.arange(t, device=self.device)[None, :] >= (self.lengths[:, None] - w)
        self.repack(keep=keep, reserve_tokens=slack)

    def clone(self) -> LayerStore:
        other = LayerStore.__new__(LayerStore)
        other.__dict__.update(self.__dict__)
        for name in ("keys", "values", "positions", "start", "capacity", "lengths"):
            setattr(other, name, getattr(self, name).clone())
        return other

    # ------------------------------------------------------------- memory
    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.start, self.capacity, self.lengths]

    def bytes_allocated(self) -> int:
        """Bytes of tensor storage this layer holds (K, V, positions and block metadata)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def bytes_in_use(self) -> int:
        """Bytes of K and V holding live tokens."""
        return int(self.lengths.sum()) * self.head_dim * 2 * self.keys.element_size()

    def kv_bytes_allocated(self) -> int:
        """Bytes of the K and V pools alone."""
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()


def ceil_div_tensor(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


@dataclass
class KVStore:
    """All layers of one batch. ``layers[i]`` is a :class:`LayerStore`."""

    layers: list[LayerStore]
    block_size: int

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, block_size: int = 16,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              sliding_windows: list[int | None] | None = None) -> KVStore:
        check(block_size > 0 and block_size & (block_size - 1) == 0,
              f"block_size must be a power of two (1, 2, 4, ..., 256), got {block_size}")
        windows = sliding_windows or [None] * num_layers
        layers = [
            LayerStore(batch, kv_heads, head_dim, block_size, dtype, torch.device(device), windows[i])
            for i in range(num_layers)
        ]
        return cls(layers=layers, block_size=block_size)

    @property
    def batch(self) -> int:
        return self.layers[0].batch

    @property
    def kv_heads(self) -> int:
        return self.layers[0].kv_heads

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def compressible_layers(self) -> list[int]:
        """Layers a method may compress: all but sliding-window layers (those keep their window)."""
        return [i for i, layer in enumerate(self.layers) if layer.sliding_window is None]

    def lengths(self) -> torch.Tensor:
        """``[layers, batch, kv_heads]`` tokens held."""
        return torch.stack([layer.lengths.view(self.batch, self.kv_heads) for layer in self.layers])

    def clone(self) -> KVStore:
        return KVStore(layers=[layer.clone() for layer in self.layers], block_size=self.block_size)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def bytes_in_use(self) -> int:
        return sum(layer.bytes_in_use() for layer in self.layers)

    def kv_bytes_allocated(self) -> int:
        return sum(layer.kv_bytes_allocated() for layer in self.layers)
