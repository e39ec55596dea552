"""The paged KV store that every kvlab method works on.

Layout, per layer: one pool of fixed-size blocks for keys and one for values, ``[num_blocks,
block_size, head_dim]``, plus the original position of every slot. Each *row* -- one (sequence, KV
head) pair, ``row = b * kv_heads + h`` -- owns a run of blocks ``[start, start + capacity)`` and uses
its first ``length`` slots; its block table is that run. Rows have their own lengths, so eviction can
remove different numbers of tokens from each head and sequence.

Host and device. ``start``, ``capacity`` and ``lengths`` live on the device of the pool (the kernels
read them) and, as plain Python lists, on the host (``start_host``, ``capacity_host``,
``lengths_host``): everything a decode step decides -- how wide a read is, whether a row is full,
whether the layer must grow -- is decided from the host copies, so no step waits for the device.
Both are updated wherever they change: a decode append is a fixed-shape slot write on the device
(``append_decode``) and ``+1`` on the host.

Eviction either repacks (``repack``: the survivors of every row are compacted into the front of a
freshly sized pool and the old one is released, so freed memory really goes back, as in KV-Compress)
or, during decode, marks slots dead (position -1, ``holes``) and compacts them away in place every
few steps (``compact``), so a step never copies the whole cache. Because each row's blocks stay
physically consecutive, a full read of a row is a slice (no copy), a read of selected blocks is a
gather of contiguous block runs, and only token-granular selection gathers single tokens. When every
row has the same capacity, the whole layer is also one dense ``[batch, kv_heads, capacity *
block_size, head_dim]`` view, the fast path for uncompressed decode.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from kvlab.errors import check

_LAYOUTS = itertools.count(1)  # every pool allocation gets a new layout version (CUDA graphs key on it)
WINDOW_SLACK = 64  # tokens a sliding-window layer may hold behind its window before it trims (trims are batched)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def ceil_div_tensor(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def _host_list(values: torch.Tensor | list[int] | int, rows: int) -> list[int]:
    """Per-row ints on the host from a tensor (read back once), a list, or one int for every row."""
    if isinstance(values, torch.Tensor):
        values = values.expand(rows).tolist() if values.dim() == 0 or values.numel() == 1 else values.tolist()
    elif isinstance(values, int):
        values = [values] * rows
    return [int(v) for v in values]


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
    keys: torch.Tensor = field(init=False, repr=False)  # [num_blocks * block_size, head_dim]
    values: torch.Tensor = field(init=False, repr=False)
    positions: torch.Tensor = field(init=False, repr=False)  # [num_blocks * block_size] int64, -1 where empty
    start_host: list[int] = field(init=False, repr=False)  # first block of each row
    capacity_host: list[int] = field(init=False, repr=False)  # blocks owned by each row
    lengths_host: list[int] = field(init=False, repr=False)  # tokens in use (dead slots included)

    holes = False  # some slots before a row's length are dead (position -1): reads must check positions
    layout_version = 0  # changes whenever the pools are reallocated
    _full_table: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = self.batch * self.kv_heads
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._allocate([0] * rows)

    # ----------------------------------------------------------- row metadata (device tensors + host lists)
    @property
    def lengths(self) -> torch.Tensor:
        """``[rows]`` tokens in use, on the device (the host copy is ``lengths_host``)."""
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value
        self.lengths_host = _host_list(value, value.numel())

    @property
    def start(self) -> torch.Tensor:
        return self._start

    @start.setter
    def start(self, value: torch.Tensor) -> None:
        self._start = value
        self.start_host = _host_list(value, value.numel())
        self._row_base = value * self.block_size  # first slot of each row

    @property
    def row_base(self) -> torch.Tensor:
        """``[rows]`` on the device: the pool slot of each row's logical slot 0 (``start * block_size``)."""
        return self._row_base

    @property
    def capacity(self) -> torch.Tensor:
        return self._capacity

    @capacity.setter
    def capacity(self, value: torch.Tensor) -> None:
        self._capacity = value
        self.capacity_host = _host_list(value, value.numel())

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
        return len(set(self.capacity_host)) <= 1

    @property
    def max_length(self) -> int:
        """The longest row, from the host copy."""
        return max(self.lengths_host, default=0)

    @property
    def max_capacity_tokens(self) -> int:
        """Slots of the largest row (a bound of every row's length until the layer grows)."""
        return max(self.capacity_host, default=0) * self.block_size

    def _allocate(self, capacity_blocks: torch.Tensor | list[int]) -> None:
        caps = _host_list(capacity_blocks, self.rows)
        starts = list(itertools.accumulate([0] + caps[:-1])) if caps else []
        self._set_rows(starts, caps)
        slots = sum(caps) * self.block_size
        self.keys = torch.zeros(slots, self.head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(slots, self.head_dim, dtype=self.dtype, device=self.device)
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=self.device)

    def _set_rows(self, starts: list[int], caps: list[int]) -> None:
        """New row starts and capacities (host lists), mirrored on the device: a new layout."""
        self._capacity = torch.tensor(caps, dtype=torch.long, device=self.device)
        self.capacity_host = caps
        self._start = torch.tensor(starts, dtype=torch.long, device=self.device)
        self.start_host = starts
        self._row_base = self._start * self.block_size
        self.layout_version = next(_LAYOUTS)
        self.holes = False
        self._full_table = None

    def in_use(self, width: int) -> torch.Tensor:
        """``[rows, width]`` bool on the store's device: logical slot ``j`` of a row holds a token (``j < length``)."""
        return torch.arange(width, device=self.device)[None, :] < self._lengths.to(self.device)[:, None]

    def row_slots(self, row: int) -> slice:
        """Slots of the tokens in use in ``row`` (a slice: the row is contiguous)."""
        first = self.start_host[row] * self.block_size
        return slice(first, first + self.lengths_host[row])

    def block_table(self) -> torch.Tensor:
        """``[batch, kv_heads, max_blocks]`` physical block ids of the blocks in use, -1 padded."""
        width = max(ceil_div(self.max_length, self.block_size), 1)
        used = ceil_div_tensor(self._lengths, self.block_size)
        offsets = torch.arange(width, device=self.device)[None, :]
        table = torch.where(offsets < used[:, None], self._start[:, None] + offsets, -1)
        return table.view(self.batch, self.kv_heads, width)

    def full_block_table(self) -> torch.Tensor:
        """``[rows, width]`` int32 on the store's device (a broadcast view): every block of every row, numbered
        within the row (``0 .. width - 1``, ``width`` the largest row capacity, at least 1). Built once per
        layout, so every decode step of a layout reads the same tensor (a captured CUDA graph stays valid)."""
        if self._full_table is None or self._full_table[0] != self.layout_version:
            width = max(max(self.capacity_host, default=0), 1)
            table = torch.arange(width, dtype=torch.int32, device=self.device)[None, :].expand(self.rows, width)
            self._full_table = (self.layout_version, table)
        return self._full_table[1]

    def dense_view(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[B, H, T, D]`` and positions ``[B, H, T]`` as views (uniform layout only).

        ``T`` is ``width`` (default: the longest row, from the host copy); slots past a row's length
        hold position -1.
        """
        assert self.uniform
        cap = self.capacity_host[0] * self.block_size if self.rows else 0
        t = min(self.max_length if width is None else width, cap)
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
    def reserve(self, tokens_per_row: torch.Tensor | list[int] | int) -> None:
        """Make room for at least ``tokens_per_row`` more tokens in every row (repacks if needed)."""
        extra = _host_list(tokens_per_row, self.rows)
        self._ensure_capacity([ceil_div(n + e, self.block_size) for n, e in zip(self.lengths_host, extra,
                                                                                  strict=True)])

    def _ensure_capacity(self, need_blocks: torch.Tensor | list[int]) -> None:
        """Grow rows that need more blocks. A uniform layer stays uniform (every row gets the largest
        need), so uncompressed batches keep the one-view dense path; a ragged layer grows per row."""
        need = _host_list(need_blocks, self.rows)
        if all(n <= c for n, c in zip(need, self.capacity_host, strict=True)):
            return
        if self.uniform:
            need = [max(need)] * self.rows
        self.repack(keep=None, capacity_blocks=[max(n, c) for n, c in zip(need, self.capacity_host, strict=True)])

    def ensure_room(self, tokens: int = 1, window_slack: int | None = WINDOW_SLACK) -> None:
        """Before a decode step (host decisions, device work only when needed): room for ``tokens`` more
        per row, growing by a quarter when full; a sliding-window layer first drops, in place, what has
        fallen ``window_slack`` tokens behind its window (``None``: no trim)."""
        w = self.sliding_window
        if w is not None and window_slack is not None and self.max_length + tokens > w + window_slack:
            t = self.max_length
            keep = torch.arange(t, device=self.device)[None, :] >= (self._lengths[:, None] - w)
            self.compact([min(n, w) for n in self.lengths_host], keep)
        if all(n + tokens <= c * self.block_size for n, c in zip(self.lengths_host, self.capacity_host, strict=True)):
            return
        grow = [max(n // 4, self.block_size) for n in self.lengths_host]  # amortised growth
        self._ensure_capacity([ceil_div(n + tokens + g, self.block_size) for n, g in zip(self.lengths_host, grow,
                                                                                            strict=True)])

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Append new tokens. ``keys``/``values``: ``[B, H, L, D]``; ``positions``/``valid``: ``[B, L]``.

        Tokens where ``valid`` is False (left padding) are not stored. One token per row and no
        ``valid`` is a decode append (:meth:`append_decode`); otherwise (prefill) the counts are read
        back once to keep the host copies.
        """
        batch, heads, new, _ = keys.shape
        check(batch == self.batch and heads == self.kv_heads, "append: batch or KV heads do not match the store")
        if new == 1 and valid is None:
            self.append_decode(keys, values, positions)
            return
        if valid is None:
            valid = torch.ones(batch, new, dtype=torch.bool, device=keys.device)
        counts = [int(c) for c in valid.sum(1).tolist() for _ in range(heads)]  # [rows], read back once
        self.ensure_room(max(counts, default=0), window_slack=None)  # prefill trims after attention
        # Slot of each new valid token: row start + current length + rank among the row's valid tokens.
        rank = torch.cumsum(valid.long(), 1) - 1  # [B, L]
        base = (self._row_base + self._lengths).view(batch, heads, 1).to(rank.device)
        slots = base + rank[:, None, :]  # [B, H, L]
        mask = valid[:, None, :].expand(batch, heads, new)
        slots = slots[mask].to(self.device)
        self.keys[slots] = keys[mask].to(self.dtype)
        self.values[slots] = values[mask].to(self.dtype)
        self.positions[slots] = positions[:, None, :].expand(batch, heads, new)[mask].to(self.positions.device)
        self._lengths += torch.tensor(counts, dtype=torch.long, device=self.device)
        self.lengths_host = [n + c for n, c in zip(self.lengths_host, counts, strict=True)]

    def append_decode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """One token per row (``keys``/``values`` ``[B, H, 1, D]``, ``positions`` ``[B, 1]``): a fixed-shape
        write into each row's next slot and ``lengths + 1``, on the device; ``+1`` on the host.

        Nothing here reads the device, so a step of appends can be captured in a CUDA graph; the
        driver makes room first (:meth:`ensure_room`), so the check below only grows a layer that was
        appended to without it.
        """
        if any(n >= c * self.block_size for n, c in zip(self.lengths_host, self.capacity_host, strict=True)):
            self.ensure_room(1)
        rows, d = self.rows, self.head_dim
        slots = self._row_base + self._lengths  # [rows]
        self.keys.index_copy_(0, slots, keys.reshape(rows, d).to(self.dtype))
        self.values.index_copy_(0, slots, values.reshape(rows, d).to(self.dtype))
        pos = positions.reshape(self.batch, 1).to(self.positions.device).expand(self.batch, self.kv_heads)
        self.positions.index_copy_(0, slots, pos.reshape(rows))
        self._lengths.add_(1)
        self.lengths_host = [n + 1 for n in self.lengths_host]

    def advance_host(self, tokens: int = 1) -> None:
        """The host side of :meth:`append_decode` alone: the device work ran in a replayed CUDA graph."""
        self.lengths_host = [n + tokens for n in self.lengths_host]

    def repack(self, keep: torch.Tensor | None = None, capacity_blocks: torch.Tensor | list[int] | None = None,
               reserve_tokens: int = 0) -> None:
        """Compact each row into a freshly sized pool and release the old one.

        ``keep``: ``[rows, T]`` bool over each row's slots (``T`` ≥ the longest row; slots past a row's
        length are ignored), order preserved. ``capacity_blocks``: the new capacity per row; by default
        just enough for the kept tokens plus ``reserve_tokens``. Dead slots (position -1) are dropped.
        The new lengths are read back once (eviction and growth are not per-step work).
        """
        old_keys, old_values, old_positions = self.keys, self.values, self.positions
        old_base = self._row_base
        t = self.max_length
        in_use = self.in_use(t)  # [rows, T]
        if keep is not None:
            check(keep.shape[0] == self.rows and keep.shape[1] >= t, "repack: keep mask has the wrong shape")
            in_use = in_use & keep[:, :t].to(in_use.device)
        src = old_base[:, None] + torch.arange(t, device=self.device)[None, :]
        if self.holes:
            in_use = in_use & (old_positions[src.clamp(max=max(old_positions.shape[0] - 1, 0))] >= 0)
        new_lengths = in_use.sum(1)
        if capacity_blocks is None:
            capacity_blocks = ceil_div_tensor(new_lengths + reserve_tokens, self.block_size)
        self._allocate(capacity_blocks)
        dst = self._row_base[:, None] + torch.cumsum(in_use.long(), 1) - 1
        src, dst = src[in_use], dst[in_use]
        self.keys[dst] = old_keys[src]
        self.values[dst] = old_values[src]
        self.positions[dst] = old_positions[src]
        self.lengths = new_lengths

    def compact(self, new_lengths: list[int], keep: torch.Tensor | None = None) -> None:
        """In place, with fixed shapes: move the live tokens of every row (not dead, and kept by
        ``keep``, ``[rows, W]`` bool over the row's logical slots, slots at or past ``W`` dropped) to
        its front, in order. ``new_lengths``: how many tokens each row keeps, which the caller knows on
        the host (no read-back). The pools stay where they are (a CUDA graph captured over them stays
        valid) and keep their size: the compaction of decode-time eviction, not a release.
        """
        slots = self.positions.shape[0]
        if slots == 0:
            return
        device = self.device
        slot = torch.arange(slots, device=device)
        row = torch.bucketize(slot, self._row_base, right=True) - 1  # the row of each slot
        offset = slot - self._row_base[row]
        live = (offset < self._lengths[row]) & (self.positions >= 0)
        if keep is not None:
            width = keep.shape[1]
            live &= keep.to(device)[row, offset.clamp(max=max(width - 1, 0))] & (offset < width)
        cum = torch.cumsum(live.long(), 0)  # running count over the whole pool (rows are consecutive)
        first = self._row_base.clamp(max=slots - 1)
        before = cum[first] - live[first].long()  # live slots in the rows before each row
        end = (self._row_base + self._capacity * self.block_size - 1).clamp(min=0, max=slots - 1)
        count = torch.where(self._capacity > 0, cum[end] - before, 0)  # live slots per row
        # destination slot d (offset o in its row) takes the (o + 1)-th live slot of its row
        src = torch.searchsorted(cum, before[row] + offset + 1).clamp(max=slots - 1)
        filled = offset < count[row]
        self.keys.copy_(torch.where(filled[:, None], self.keys[src], self.keys))
        self.values.copy_(torch.where(filled[:, None], self.values[src], self.values))
        self.positions.copy_(torch.where(filled, self.positions[src], -1))
        self._lengths.copy_(count)
        self.lengths_host = list(new_lengths)
        self.holes = False

    def trim_window(self, slack: int) -> None:
        """Sliding-window layers: drop tokens more than ``window`` behind the newest, once ``slack`` pile up
        (prefill: a repack, which gives the memory back; decode trims in place, see :meth:`ensure_room`)."""
        w = self.sliding_window
        if w is None or self.max_length <= w + slack:
            return
        t = self.max_length
        keep = torch.arange(t, device=self.device)[None, :] >= (self._lengths[:, None] - w)
        self.repack(keep=keep, reserve_tokens=slack)

    def clone(self) -> LayerStore:
        other = LayerStore.__new__(LayerStore)
        other.__dict__.update(self.__dict__)
        for name in ("keys", "values", "positions", "_start", "_capacity", "_lengths"):
            setattr(other, name, getattr(self, name).clone())
        other._row_base = other._start * other.block_size
        for name in ("start_host", "capacity_host", "lengths_host"):
            setattr(other, name, list(getattr(self, name)))
        other.layout_version = next(_LAYOUTS)
        other._full_table = None
        return other

    # ------------------------------------------------------------- memory
    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.start, self.capacity, self.lengths]

    def bytes_allocated(self) -> int:
        """Bytes of tensor storage this layer holds (K, V, positions and block metadata)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def bytes_in_use(self) -> int:
        """Bytes of K and V holding live tokens."""
        return sum(self.lengths_host) * self.head_dim * 2 * self.keys.element_size()

    def kv_bytes_allocated(self) -> int:
        """Bytes of the K and V pools alone."""
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()


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

    def ensure_room(self, tokens: int = 1, window_slack: int | None = WINDOW_SLACK) -> None:
        """:meth:`LayerStore.ensure_room` on every layer (host decisions; device work only to grow or trim)."""
        for layer in self.layers:
            layer.ensure_room(tokens, window_slack)

    def advance_host(self, tokens: int = 1) -> None:
        """After a replayed CUDA graph of a decode step: the host copies of every layer's lengths follow."""
        for layer in self.layers:
            layer.advance_host(tokens)

    def signature(self) -> tuple:
        """What a captured decode step depends on besides device data: every layer's layout and holes."""
        return tuple((layer.layout_version, layer.holes) for layer in self.layers)

    def clone(self) -> KVStore:
        return KVStore(layers=[layer.clone() for layer in self.layers], block_size=self.block_size)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def bytes_in_use(self) -> int:
        return sum(layer.bytes_in_use() for layer in self.layers)

    def kv_bytes_allocated(self) -> int:
        return sum(layer.kv_bytes_allocated() for layer in self.layers)
