"""``quantize``: int8 / int4 K/V after KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", arXiv 2402.02750).

KIVI's finding: keys have outlier *channels*, values do not, so keys are quantized per channel (one
scale and minimum per channel over a group of ``group`` tokens) and values per token (one scale and
minimum per token and head). Asymmetric min/max quantization; scales and minima in fp16. Keys of the
newest, not yet complete group stay in full precision (KIVI's residual) until the group fills.

The codes are really packed: int8 is one ``uint8`` per number, int4 two numbers per ``uint8``. The
store's K/V bytes are the storage of those codes, the scales and the residual
(:class:`QuantizedLayerStore`), so ``cache_mb_after_prefill`` reports the packed size.

Composable: ``inner="snapkv"`` (any registered method) runs that method first -- its ``prefill_end``,
``decode_plan`` and ``step_end``, with the budget given here -- and quantizes what it keeps. Only
compressible (global) layers are quantized; sliding-window layers keep their window as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import check
from kvlab.methods._lowrank_store import CodedLayerStore
from kvlab.methods.base import Method, PrefillContext, StepContext, StepPlan, make_method, register

SCALE_DTYPE = torch.float16


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of ``x`` along ``dim``: ``(codes uint8 unpacked, scale, minimum)``.

    ``scale`` and ``minimum`` are fp16 (keepdim), and the codes are computed from the fp16 values, so
    ``dequantize(codes, scale, minimum)`` is exactly what is stored.
    """
    levels = 2**bits - 1
    xf = x.float()
    mn = xf.amin(dim, keepdim=True).to(SCALE_DTYPE)
    mx = xf.amax(dim, keepdim=True)
    scale = ((mx - mn.float()) / levels).clamp(min=1e-5).to(SCALE_DTYPE)
    codes = torch.round((xf - mn.float()) / scale.float()).clamp(0, levels).to(torch.uint8)
    return codes, scale, mn


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + minimum.float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int4: two codes per byte (even channel in the low nibble); int8: unchanged."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


class QuantizedLayerStore(CodedLayerStore):
    """A layer with int8/int4 K/V: per-channel key scales per ``group`` tokens, per-token value scales.

    Tensors (all counted): ``k_codes``/``v_codes`` ``[slots, D * bits / 8]`` uint8; ``k_scale``
    ``[slots / group, 2, D]`` fp16 (scale, minimum); ``v_scale`` ``[slots, 2]`` fp16; ``k_residual``
    ``[rows, group, D]`` in the model dtype (keys of each row's incomplete group).
    """

    def __init__(self, layer: LayerStore, bits: int, group: int):
        check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
        check(group >= 1 and group & (group - 1) == 0, f"group must be a power of two, got {group}")
        check(bits == 8 or layer.head_dim % 2 == 0, "int4 packs two channels per byte: head_dim must be even")
        self.bits, self.group, self.align_tokens = bits, group, group
        self._init_from(layer)
        self.k_residual = torch.zeros(self.rows, group, self.head_dim, dtype=self.dtype, device=self.device)
        self._fill_from(layer)

    def _alloc_codes(self, slots: int) -> None:
        width = self.head_dim * self.bits // 8
        self.k_codes = torch.zeros(slots, width, dtype=torch.uint8, device=self.device)
        self.v_codes = torch.zeros(slots, width, dtype=torch.uint8, device=self.device)
        self.k_scale = torch.zeros(slots // self.group, 2, self.head_dim, dtype=SCALE_DTYPE, device=self.device)
        self.v_scale = torch.zeros(slots, 2, dtype=SCALE_DTYPE, device=self.device)

    def _code_tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.v_codes, self.k_scale, self.v_scale, self.k_residual]

    def _encode(self, row: int, offset: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        first = int(self.start[row]) * self.block_size
        n, g = k.shape[0], self.group
        # values: per token, right away
        codes, scale, mn = quantize(v, self.bits, dim=-1)
        self.v_codes[first + offset:first + offset + n] = pack(codes, self.bits)
        self.v_scale[first + offset:first + offset + n] = torch.cat((scale, mn), -1)
        # keys: complete the open group with the residual, quantize full groups, keep the rest
        group_start = offset - offset % g
        seq = torch.cat((self.k_residual[row, :offset % g], k.to(self.dtype)), 0)
        full = seq.shape[0] // g
        if full:
            blocks = seq[:full * g].view(full, g, self.head_dim)
            codes, scale, mn = quantize(blocks, self.bits, dim=1)  # per channel over the group's tokens
            s0 = first + group_start
            self.k_codes[s0:s0 + full * g] = pack(codes, self.bits).view(full * g, -1)
            self.k_scale[s0 // g:s0 // g + full] = torch.cat((scale, mn), 1)
        rest = seq[full * g:]
        self.k_residual[row, :rest.shape[0]] = rest

    def _decode_dense(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``t`` tokens of every row ``[rows, t, D]`` (uniform layout): scales broadcast per group."""
        g, rows, d = self.group, self.rows, self.head_dim
        groups = -(-t // g)
        device = self.device
        lengths = self.lengths.to(device)
        first = (self.start * self.block_size).to(device)  # multiples of the group (capacities are aligned)
        idx = first[:, None] + torch.arange(groups * g, device=device)[None, :]
        scale_idx = (first // g)[:, None] + torch.arange(groups, device=device)[None, :]
        ks = self.k_scale[scale_idx].float()  # [rows, groups, 2, D]
        k = unpack(self.k_codes[idx], self.bits).view(rows, groups, g, d).float()
        k = (k * ks[:, :, None, 0] + ks[:, :, None, 1]).view(rows, groups * g, d)
        open_rows = torch.nonzero(lengths % g != 0).flatten()
        if open_rows.numel():  # the open group of a row is its full-precision residual
            gi = lengths[open_rows] // g
            k.view(rows, groups, g, d)[open_rows, gi] = self.k_residual[open_rows].float()
        vs = self.v_scale[idx].float()
        v = unpack(self.v_codes[idx], self.bits).float() * vs[..., :1] + vs[..., 1:]
        return k[:, :t].to(self.dtype), v[:, :t].to(self.dtype)

    def _decode_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(self.device)
        vs = self.v_scale[slots]
        v = dequantize(unpack(self.v_codes[slots], self.bits), vs[..., :1], vs[..., 1:])
        ks = self.k_scale[slots // self.group]
        k = dequantize(unpack(self.k_codes[slots], self.bits), ks[..., 0, :], ks[..., 1, :])
        row, off = self.slot_rows(slots)
        in_residual = off >= (self.lengths.to(self.device)[row] // self.group) * self.group
        if bool(in_residual.any()):
            k[in_residual] = self.k_residual[row[in_residual], off[in_residual] % self.group].float()
        return k.to(self.dtype), v.to(self.dtype)


@register
@dataclass
class Quantize(Method):
    """int8/int4 K/V (KIVI layout), alone or under another method (``inner``) with the budget given here."""

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "KIVI int8/int4 K/V: per-channel key, per-token value scales; composable (inner=)"
    family: ClassVar[str] = "smaller vectors"

    bits: int = 8
    group: int = 32
    inner: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.bits in (4, 8), f"bits must be 4 or 8, got {self.bits}")
        check(self.group >= 1 and self.group & (self.group - 1) == 0,
              f"group must be a power of two (tokens per key scale), got {self.group}")
        check(self.inner != "quantize", "quantize cannot be its own inner method")
        budget = dict(budget=self.budget, ratio=self.ratio, budget_tokens=self.budget_tokens)
        if self.inner is None:
            check(all(v is None for v in budget.values()),
                  "quantize alone keeps every token: give inner=<method> to combine it with a budget")
            self._inner: Method | None = None
        else:
            self._inner = make_method(self.inner, **{k: v for k, v in budget.items() if v is not None})

    def observation_window(self) -> int:
        return self._inner.observation_window() if self._inner else 0

    def observes_decode_queries(self) -> bool:
        return self._inner.observes_decode_queries() if self._inner else False

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        if self._inner is not None:
            self._inner.prefill_end(store, ctx)
        for i in store.compressible_layers():
            if not isinstance(store.layers[i], QuantizedLayerStore):
                store.layers[i] = QuantizedLayerStore(store.layers[i], self.bits, self.group)

    def decode_reserve(self, tokens: int) -> int:
        return self._inner.decode_reserve(tokens) if self._inner else tokens

    def plan_step(self, store: KVStore, step: StepPlan) -> StepPlan:
        return self._inner.plan_step(store, step) if self._inner else step

    def decode_plan(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: StepPlan) -> ReadPlan | None:
        return self._inner.decode_plan(layer_idx, layer, query, step) if self._inner else None

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        if self._inner is not None:
            self._inner.step_end(store, ctx)

    def decode_end(self, store: KVStore) -> None:
        if self._inner is not None:
            self._inner.decode_end(store)


def with_quantization(method: Method | str, bits: int = 8, group: int = 32, **budget: float | int) -> Quantize:
    """``method`` with its kept K/V quantized: ``with_quantization("streaming", 4, budget=0.5)``."""
    name = method if isinstance(method, str) else method.name
    if not isinstance(method, str):
        budget = {k: getattr(method, k) for k in ("budget", "ratio", "budget_tokens") if getattr(method, k) is not None}
    q = Quantize(bits=bits, group=group, inner=name, **budget)
    if not isinstance(method, str):
        q._inner = method  # keep the caller's own parameters
    return q
