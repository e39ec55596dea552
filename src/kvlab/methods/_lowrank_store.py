"""A layer store that keeps K/V *encoded* (quantized or projected) and decodes them when read.

:class:`CodedLayerStore` subclasses the lead's :class:`~kvlab.cache.store.LayerStore`: it keeps the same
row layout (``start``, ``capacity``, ``lengths``, ``positions``; a row owns a contiguous run of blocks)
and the same reading surface (``dense_view``, ``row_view``, ``keys``/``values``, ``block_table``), but
the K/V pools are replaced by whatever the subclass encodes (``_alloc_codes``, ``_encode``,
``_decode_slots``). Memory accounting sums the storage of the encoded tensors, so packed bytes are
counted for real.

Mutations go through the encoder: ``append`` encodes the new tokens row by row, ``repack`` decodes
the kept tokens and re-encodes them into a freshly sized pool (eviction under a composed method,
growth, sliding-window trims).

Also here: :class:`Rope`, the model's own rotary embedding for arbitrary positions, used to move keys
between their pre- and post-RoPE forms.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch

from kvlab.cache.store import LayerStore, ceil_div, ceil_div_tensor
from kvlab.errors import check


class CodedLayerStore(LayerStore):
    """Base class; see the module docstring. Subclasses set ``align_tokens`` and the three codec hooks."""

    align_tokens: int = 1  # row starts are rounded to a multiple of this many tokens

    def _init_from(self, layer: LayerStore) -> None:
        for name in ("batch", "kv_heads", "head_dim", "block_size", "dtype", "device", "sliding_window"):
            setattr(self, name, getattr(layer, name))
        self.lengths = torch.zeros_like(layer.lengths)  # row metadata stays where the plain store keeps it

    def _fill_from(self, layer: LayerStore) -> None:
        """Encode every row of a plain layer (called once by the subclass constructor)."""
        self._allocate(layer.capacity.clone())
        for row in range(self.rows):
            k, v, p = layer.row_view(row)
            self._write_row(row, k, v, p)

    # -- codec hooks
    def _alloc_codes(self, slots: int) -> None:
        raise NotImplementedError

    def _code_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _encode(self, row: int, offset: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store tokens ``offset .. offset + n`` of ``row`` (``k``, ``v``: ``[n, D]`` post-RoPE, ``pos``: ``[n]``)."""
        raise NotImplementedError

    def _decode_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values ``[..., D]`` at physical ``slots`` (which hold live tokens)."""
        raise NotImplementedError

    # -- layout
    @property
    def num_blocks(self) -> int:
        return self.positions.shape[0] // self.block_size

    def _allocate(self, capacity_blocks: torch.Tensor | list[int]) -> None:
        align = max(1, self.align_tokens // self.block_size)
        caps = [ceil_div(int(c), align) * align for c in torch.as_tensor(capacity_blocks).tolist()]
        self._set_rows(list(itertools.accumulate([0, *caps[:-1]])) if caps else [], caps)  # a new layout version
        slots = sum(caps) * self.block_size
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=self.device)
        self._alloc_codes(slots)

    def slot_rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row of each physical slot and its offset within the row (on the slots' device)."""
        first = (self.start * self.block_size).to(slots.device)
        row = torch.searchsorted(first, slots, right=True) - 1
        return row, slots - first[row]

    def _row_slot_index(self, t: int) -> torch.Tensor:
        """``[rows, t]`` physical slots of each row's first ``t`` logical slots (clamped into the row)."""
        first = (self.start * self.block_size).to(self.device)
        last = first + (self.capacity.to(self.device) * self.block_size - 1).clamp(min=0)
        return torch.minimum(first[:, None] + torch.arange(t, device=self.device)[None, :], last[:, None])

    # -- reads (decoded)
    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.uniform
        t = int(self.lengths.max()) if self.rows else 0
        slots = self._row_slot_index(t)
        k, v = self._decode_dense(t) if hasattr(self, "_decode_dense") else self._decode_slots(slots)
        p = torch.where(self.in_use(t), self.positions[slots], -1)
        shape = (self.batch, self.kv_heads, t)
        return k.view(*shape, self.head_dim), v.view(*shape, self.head_dim), p.view(*shape)

    def row_view(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.row_slots(row)
        slots = torch.arange(s.start, s.stop, device=self.device)
        k, v = self._decode_slots(slots)
        return k, v, self.positions[s]

    def _live_slots(self) -> torch.Tensor:
        t = int(self.lengths.max()) if self.rows else 0
        idx = self._row_slot_index(t)
        return idx[self.in_use(t)]

    def _decoded_pool(self, which: int) -> torch.Tensor:
        out = torch.zeros(self.positions.shape[0], self.head_dim, dtype=self.dtype, device=self.device)
        slots = self._live_slots()
        if slots.numel():
            out[slots] = self._decode_slots(slots)[which].to(self.dtype)
        return out

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        """The whole key pool, decoded (for code that indexes pools directly)."""
        return self._decoded_pool(0)

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        return self._decoded_pool(1)

    # -- mutation
    def _write_row(self, row: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        n = k.shape[0]
        if n == 0:
            return
        offset = int(self.lengths[row])
        check(offset + n <= int(self.capacity[row]) * self.block_size, "coded store: row overflow")
        first = int(self.start[row]) * self.block_size + offset
        self.positions[first:first + n] = pos.to(self.positions.device)
        self._encode(row, offset, k, v, pos)
        self.lengths[row] += n
        self.lengths_host[row] += n

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        batch, heads, new, _ = keys.shape
        check(batch == self.batch and heads == self.kv_heads, "append: batch or KV heads do not match the store")
        if valid is None:
            valid = torch.ones(batch, new, dtype=torch.bool, device=keys.device)
        counts = valid.sum(1).repeat_interleave(heads).to(self.lengths.device)
        need = ceil_div_tensor(self.lengths + counts, self.block_size)
        if bool((need > self.capacity).any()):
            grow = torch.clamp(self.lengths // 4, min=self.block_size)
            need = ceil_div_tensor(self.lengths + counts + grow, self.block_size)
            if hasattr(self, "_ensure_capacity"):  # the store's own growth policy (uniform stays uniform)
                self._ensure_capacity(need)
            else:
                self.repack(keep=None, capacity_blocks=torch.maximum(need, self.capacity))
        for row in range(self.rows):
            b, h = divmod(row, heads)
            sel = valid[b]
            self._write_row(row, keys[b, h][sel], values[b, h][sel], positions[b][sel])

    def append_decode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.append(keys, values, positions)  # encoded row by row (a coded layer is not captured in graphs)

    def compact(self, new_lengths: list[int], keep: torch.Tensor | None = None) -> None:
        """Decode-time compaction (dead slots and ``keep``): decoded and re-encoded, capacities kept."""
        self.repack(keep=keep if keep is not None else self.in_use(self.max_length),
                    capacity_blocks=list(self.capacity_host))

    def repack(self, keep: torch.Tensor | None = None, capacity_blocks: torch.Tensor | None = None,
               reserve_tokens: int = 0) -> None:
        """Decode the kept tokens of every row and re-encode them into a freshly sized pool."""
        t = int(self.lengths.max()) if self.rows else 0
        if keep is not None:
            check(keep.shape[0] == self.rows and keep.shape[1] >= t, "repack: keep mask has the wrong shape")
        rows = []
        for row in range(self.rows):
            k, v, p = self.row_view(row)
            m = p >= 0  # dead slots go
            if keep is not None:
                m = m & keep[row, :k.shape[0]].to(k.device)
            k, v, p = k[m], v[m], p[m]
            rows.append((k.clone(), v.clone(), p.clone()))
        new_lengths = torch.tensor([len(r[2]) for r in rows], dtype=torch.long, device=self.lengths.device)
        if capacity_blocks is None:
            capacity_blocks = ceil_div_tensor(new_lengths + reserve_tokens, self.block_size)
        self._allocate(capacity_blocks)
        self.lengths = torch.zeros_like(new_lengths)
        for row, (k, v, p) in enumerate(rows):
            self._write_row(row, k, v, p)

    def clone(self) -> CodedLayerStore:
        other = copy.copy(self)
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(other, name, value.clone())
        return other

    # -- memory
    def tensors(self) -> list[torch.Tensor]:
        return [*self._code_tensors(), self.positions, self.start, self.capacity, self.lengths]

    def kv_bytes_allocated(self) -> int:
        """Bytes of the encoded K/V tensors (codes, scales, residuals), as stored."""
        return sum(t.untyped_storage().nbytes() for t in self._code_tensors())

    def bytes_in_use(self) -> int:
        """Encoded bytes per slot times the live tokens (an average over the pool)."""
        slots = max(1, self.positions.shape[0])
        return int(self.kv_bytes_allocated() * int(self.lengths.sum()) / slots)


# ------------------------------------------------------------------------- RoPE
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """The model's rotary embedding of one layer, for arbitrary positions.

    Transformers applies ``k * cos + rotate_half(k) * sin`` with ``cos, sin`` scaled by the rope's
    ``attention_scaling`` ``s``: a rotation times ``s``. :meth:`unrotate` inverts it exactly
    (``cos^2 + sin^2 = s^2``), so the pre-RoPE key the layer's own ``k_proj`` (and norm) produced is
    recovered from the cached post-RoPE key without re-running the projection.
    """

    def __init__(self, model: Any, layer_idx: int):
        inner = getattr(model, "model", model)
        self.rotary = getattr(inner, "rotary_emb", None)
        check(self.rotary is not None, "pre-RoPE keys need the model's rotary embedding (model.model.rotary_emb)")
        types = getattr(model.config, "layer_types", None)
        self.layer_type = types[layer_idx] if types is not None and hasattr(self.rotary, "layer_types") else None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[..., D]`` (float32) for integer ``positions`` of any shape."""
        flat = positions.reshape(1, -1).clamp(min=0)
        x = torch.zeros(1, dtype=torch.float32, device=positions.device)
        if self.layer_type is not None:
            cos, sin = self.rotary(x, flat, self.layer_type)
        else:
            cos, sin = self.rotary(x, flat)
        d = cos.shape[-1]
        return cos.reshape(*positions.shape, d).float(), sin.reshape(*positions.shape, d).float()

    def frequencies(self) -> tuple[torch.Tensor, float] | None:
        """``(inv_freq [D_rot / 2], attention_scaling)`` when the rotation at position ``p`` is by angles
        ``p * inv_freq`` with fixed frequencies (the form a kernel applies on chip); ``None`` for rope types
        that re-derive their frequencies from the positions of each call (dynamic NTK, LongRoPE)."""
        prefix = f"{self.layer_type}_" if self.layer_type is not None else ""
        rope_type = getattr(self.rotary, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(self.layer_type, "default")
        inv_freq = getattr(self.rotary, f"{prefix}inv_freq", None)
        scaling = getattr(self.rotary, f"{prefix}attention_scaling", None)
        if inv_freq is None or scaling is None or "dynamic" in rope_type or rope_type == "longrope":
            return None
        return inv_freq, float(scaling)

    def rotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(positions)
        kf = k.float()
        return (kf * cos + rotate_half(kf) * sin).to(k.dtype)

    def unrotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(positions)
        kf = k.float()
        return ((kf * cos - rotate_half(kf) * sin) / (cos * cos + sin * sin)).to(k.dtype)
