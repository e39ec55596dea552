"""``low-rank``: cache K and/or V projected to rank ``R < head_dim`` per (layer, KV head).

After Palu (Chang et al., 2024, "Palu: Compressing KV-Cache with Low-Rank Projection", arXiv
2407.21118) and Eigen Attention (Saxena et al., 2024, arXiv 2408.05646); the latent-cache idea is
DeepSeek-V2's MLA (arXiv 2405.04434), which trains it in.

Each cached vector ``x`` (``[D]``) is stored as ``c = x @ P`` with ``P`` ``[D, R]`` orthonormal columns
(one ``P`` per layer and KV head), and read back as ``c @ P^T``. Projections:

- ``orthogonal``: a random orthogonal ``P`` (no calibration; the baseline a fitted basis must beat);
- ``pca``: the top-``R`` eigenvectors of ``X^T X`` on real text, fitted by ``kvlab calibrate`` and saved
  to a file keyed by model name and rank (:mod:`kvlab.experiments.calibrate`).

``mode="v-only"`` projects values only; ``mode="kv"`` keys too. Keys are compressed *before* RoPE by
default (``keys="pre-rope"``): the cached post-RoPE key is un-rotated exactly (the rotation is
orthogonal, see :class:`~kvlab.methods._lowrank_store.Rope`), which equals what the layer's ``k_proj``
(and k-norm) produced, projected, and re-rotated at its stored position when read. ``keys="post-rope"``
projects the rotated keys instead, so the two can be compared (RoPE mixes position into the spectrum).

Attention runs in the compressed space where the algebra allows (:meth:`LowRankLayerStore.attend_override`):
values are weighted as latents and expanded once per head, ``out = (softmax . V_c) . P_v^T``; post-RoPE
keys score as ``(q . P_k) . K_c^T``; pre-RoPE keys are reconstructed and rotated, then scored. On CUDA a
decode step that reads every token runs kvlab's low-rank Triton kernel
(:mod:`kvlab.kernels.lowrank_attention`), which does the same on chip without expanding the cache.
Memory: the store holds ``R`` numbers per cached vector in the model dtype (the projections are model
constants, like weights, and are not counted as cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.attention.reads import full_lists
from kvlab.attention.torch_attention import (
    _attend_rows,
    _expand_groups,
    attend_plan,
    attend_ragged,
    group_queries,
    ungroup_output,
    visibility,
)
from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import KVLabError, check
from kvlab.files import calibration_path
from kvlab.kernels.dispatch import Backend, lowrank_decode_attention, use_triton
from kvlab.methods._lowrank_store import CodedLayerStore, Rope
from kvlab.methods.base import Method, PrefillContext, register

MODES = ("v-only", "kv")
PROJECTIONS = ("orthogonal", "pca")
KEY_FORMS = ("pre-rope", "post-rope")


class LowRankLayerStore(CodedLayerStore):
    """A layer whose values (and optionally keys) are stored as rank-``R`` latents.

    ``pk`` / ``pv``: ``[kv_heads, D, R]`` projections (``pk=None``: keys kept whole). ``rope`` set: keys are
    projected pre-RoPE and rotated at read time. ``k_basis`` / ``v_basis``: the same projections as the
    kernel takes them, ``[kv_heads, R, D]`` with ``D`` contiguous (``x = c @ basis[h]``).
    """

    def __init__(self, layer: LayerStore, pk: torch.Tensor | None, pv: torch.Tensor, rope: Rope | None = None):
        self._init_from(layer)
        self.pk = None if pk is None else pk.to(self.device, self.dtype)  # projections are made on the CPU
        self.pv = pv.to(self.device, self.dtype)
        self.k_basis = None if self.pk is None else self.pk.transpose(1, 2).contiguous()
        self.v_basis = self.pv.transpose(1, 2).contiguous()
        self.rope = rope if pk is not None else None
        self._fill_from(layer)

    @property
    def k_width(self) -> int:
        return self.head_dim if self.pk is None else self.pk.shape[-1]

    def _alloc_codes(self, slots: int) -> None:
        self.k_codes = torch.zeros(slots, self.k_width, dtype=self.dtype, device=self.device)
        self.v_codes = torch.zeros(slots, self.pv.shape[-1], dtype=self.dtype, device=self.device)

    def _code_tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.v_codes]

    def _encode(self, row: int, offset: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        h = row % self.kv_heads
        s = int(self.start[row]) * self.block_size + offset
        n = k.shape[0]
        k = k.to(self.dtype)
        if self.pk is not None:
            if self.rope is not None:
                k = self.rope.unrotate(k, pos)
            k = k @ self.pk[h]
        self.k_codes[s:s + n] = k
        self.v_codes[s:s + n] = v.to(self.dtype) @ self.pv[h]

    def _decode_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(self.device)
        row, _ = self.slot_rows(slots)
        head = row % self.kv_heads
        kc, vc = self.k_codes[slots], self.v_codes[slots]
        k = kc if self.pk is None else torch.zeros(*slots.shape, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros(*slots.shape, self.head_dim, dtype=self.dtype, device=self.device)
        for h in range(self.kv_heads):
            m = head == h
            if self.pk is not None:
                k[m] = kc[m] @ self.pk[h].T
            v[m] = vc[m] @ self.pv[h].T
        if self.rope is not None:
            k = self.rope.rotate(k, self.positions[slots])
        return k, v

    def attend_override(self, query: torch.Tensor, q_positions: torch.Tensor, scaling: float,
                        plan: ReadPlan | None, backend: Backend | None = "auto") -> torch.Tensor:
        """Attention computed on the latents: the low-rank Triton kernel when :meth:`kernel_reads` this step
        and ``backend`` resolves to Triton, else torch (dense layout; other layouts read decoded K/V)."""
        if plan is None and self.kernel_reads(query) and use_triton(self.device, backend):
            return self._attend_kernel(query, scaling, backend)
        if plan is not None:
            return attend_plan(self, query, q_positions, scaling, plan)
        if not self.uniform:
            return attend_ragged(self, query, q_positions, scaling)
        b, hq, length, _ = query.shape
        h = self.kv_heads
        t = int(self.lengths.max()) if self.rows else 0
        slots = self._row_slot_index(t)  # [rows, t]
        live = self.in_use(t)
        kpos = torch.where(live, self.positions[slots], -1).view(b, h, t)
        q = group_queries(query, h).to(self.dtype)  # [B, H, G*L, D]
        kc = self.k_codes[slots].view(b, h, t, -1)
        vc = self.v_codes[slots].view(b, h, t, -1)
        if self.pk is None:
            k = kc
        elif self.rope is None:  # post-RoPE latents: score in the latent space
            q = q @ self.pk[None]
            k = kc
        else:  # pre-RoPE latents: reconstruct, rotate at the stored positions
            k = self.rope.rotate(kc @ self.pk.transpose(1, 2)[None], kpos)
        if length == 1 and bool(live.all()):
            mask = None
        else:
            mask = _expand_groups(visibility(kpos, q_positions[:, None, :], self.sliding_window), hq // h)
        out = _attend_rows(q, k, vc, mask, scaling) @ self.pv.transpose(1, 2)[None]  # expand once per head
        return ungroup_output(out, hq, length).to(query.dtype)

    def _kernel_rope(self) -> tuple[torch.Tensor, float] | None:
        """The frequencies the kernel rotates pre-RoPE keys with: fixed, one per pair of dimensions."""
        freqs = self.rope.frequencies() if self.rope is not None else None
        return freqs if freqs is not None and freqs[0].numel() == self.head_dim // 2 else None

    def kernel_reads(self, query: torch.Tensor) -> bool:
        """Whether the low-rank kernel computes this attention exactly (host checks only): one query token
        per sequence reading every stored token, which a decode query sees all of -- no sliding window,
        no dead slots -- and, for pre-RoPE keys, a rotation by fixed frequencies over the whole head."""
        return (query.shape[2] == 1 and self.sliding_window is None and not self.holes and self.head_dim % 2 == 0
                and (self.rope is None or self._kernel_rope() is not None))

    def _attend_kernel(self, query: torch.Tensor, scaling: float, backend: Backend | None) -> torch.Tensor:
        """:func:`~kvlab.kernels.dispatch.lowrank_decode_attention` over every block of every row (no read-back)."""
        _, hq, length, _ = query.shape
        lists = full_lists(self)
        q = group_queries(query, self.kv_heads).to(self.dtype).contiguous()
        inv_freq, rope_scale = self._kernel_rope() or (None, 1.0)
        out = lowrank_decode_attention(q, self.k_codes, self.v_codes, self.v_basis, lists.table, lists.seq_lens,
                                       lists.block_size, scaling, self.k_basis,
                                       self.positions if inv_freq is not None else None, inv_freq, rope_scale,
                                       row_offsets=lists.row_offsets, backend=backend, max_tokens=lists.max_tokens)
        return ungroup_output(out, hq, length).to(query.dtype)


def random_orthogonal(d: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """``[d, r]`` with orthonormal columns, uniformly random (QR of a Gaussian, signs fixed)."""
    q, rr = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(rr))[None, :]
    return q[:, :r].float()


def model_key(model: Any) -> str | None:
    """The name calibration files are keyed by: kvlab's name for the model, else its path or shape."""
    return getattr(model, "kvlab_name", None) or getattr(getattr(model, "config", None), "_name_or_path", None) or None


@register
@dataclass
class LowRank(Method):
    """Rank-``R`` K/V latents (Palu / Eigen Attention). ``mode``: v-only | kv; ``keys``: pre-rope | post-rope."""

    name: ClassVar[str] = "low-rank"
    summary: ClassVar[str] = "Palu / Eigen Attention: rank-R K/V latents (orthogonal or PCA), pre- or post-RoPE keys"
    family: ClassVar[str] = "smaller vectors"

    rank: int = 32
    mode: str = "v-only"
    projection: str = "orthogonal"
    keys: str = "pre-rope"
    calibration: str | None = None  # a file from `kvlab calibrate` (default: the one for the model and rank)
    seed: int = 0
    allow_full_rank: bool = False  # rank == head_dim: no compression; the exactness check of the tests

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.keep_fraction == 1.0 and self.budget_tokens is None,
              "low-rank keeps every token (it shrinks each vector): leave budget and ratio unset")
        check(self.rank > 0, f"rank must be a positive number of dimensions, got {self.rank}")
        check(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check(self.projection in PROJECTIONS, f"projection must be one of {', '.join(PROJECTIONS)}, got "
                                              f"{self.projection!r}")
        check(self.keys in KEY_FORMS, f"keys must be one of {', '.join(KEY_FORMS)}, got {self.keys!r}")

    def _check_rank(self, head_dim: int) -> None:
        limit = head_dim if self.allow_full_rank else head_dim - 1
        check(self.rank <= limit, f"rank must be below head_dim ({head_dim}) to compress anything, got {self.rank}")

    def projections(self, store: KVStore, model: Any) -> dict[int, tuple[torch.Tensor | None, torch.Tensor]]:
        """Per compressible layer: ``(pk or None, pv)``, each ``[kv_heads, D, R]``."""
        layers = store.compressible_layers()
        d, h = store.layers[0].head_dim, store.kv_heads
        if self.projection == "orthogonal":
            out = {}
            for i in layers:
                g = torch.Generator().manual_seed(self.seed * 100003 + i)
                pv = torch.stack([random_orthogonal(d, self.rank, g) for _ in range(h)])
                pk = torch.stack([random_orthogonal(d, self.rank, g) for _ in range(h)]) if self.mode == "kv" else None
                out[i] = (pk, pv)
            return out
        data = load_calibration(self.calibration, model, self.rank)
        key = "k_pre" if self.keys == "pre-rope" else "k_post"
        check(data["v"].shape[1:3] == (h, d) if data["v"].dim() == 4 else False,
              f"calibration file has shape {tuple(data['v'].shape)}, the model has {h} KV heads of dim {d}")
        return {i: (data[key][i, :, :, :self.rank] if self.mode == "kv" else None, data["v"][i, :, :, :self.rank])
                for i in layers}

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self._check_rank(store.layers[0].head_dim)
        pre_rope = self.mode == "kv" and self.keys == "pre-rope"
        check(not pre_rope or ctx.model is not None,
              "pre-RoPE keys need the model's rotary embedding: run through kvlab.decode/generate, or keys=post-rope")
        for i, (pk, pv) in self.projections(store, ctx.model).items():
            rope = Rope(ctx.model, i) if pre_rope else None
            store.layers[i] = LowRankLayerStore(store.layers[i], pk, pv, rope)


def load_calibration(path: str | None, model: Any, rank: int) -> dict[str, Any]:
    """The PCA file for ``model`` and ``rank`` (or ``path``); a clear error naming the command that makes it."""
    name = model_key(model)
    if path is None:
        check(name is not None, "pca needs a calibration file: pass calibration=PATH (from `kvlab calibrate`)")
        p = calibration_path(name, rank)
    else:
        p = Path(path).expanduser()
    if not p.is_file():
        raise KVLabError(f"no PCA calibration file {p}; create it with: kvlab calibrate --model {name or 'MODEL'} "
                         f"--rank {rank}")
    data = torch.load(p, map_location="cpu", weights_only=True)
    check(int(data["rank"]) >= rank, f"calibration file {p} holds rank {data['rank']}, asked for rank {rank}")
    return data
