"""Shared pieces of the decode-time routing methods (block-route, cluster-route, the oracles).

- :class:`RoutingMethod`: the parameters every router shares (block size, sink and local blocks,
  dense layers, refresh, the recall diagnostic) and the budget arithmetic.
- :class:`BlockMeta`: per-block key metadata (centroid, element-wise min and max) of one layer, kept
  up to date incrementally as decode appends tokens: only the blocks that changed since the last
  update (in decode, the partial last block) are recomputed. The store has no metadata hook, so the
  method keeps it, keyed on the store's pool (a repack or a new snapshot rebuilds it).
- :func:`attention_mass` and :func:`mass_recall`: the true attention of a decode query (the oracles
  and the per-step recall diagnostic; it costs a full attention pass).
- :func:`entropy_profile_path` / :func:`load_dense_layers`: where ``dense_layers=auto`` finds the
  entropy profile that ``kvlab profile entropy`` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import KVStore, LayerStore, ceil_div_tensor
from kvlab.errors import KVLabError, check
from kvlab.methods.base import Method, PrefillContext

MAX_BLOCK_SIZE = 256


# ---------------------------------------------------------------- entropy profile (dense_layers=auto)
def entropy_profile_path(model: str) -> Path:
    """``$KVLAB_CACHE/profiles/<model>-entropy.json``: ``{"model": ..., "dense_layers": [0, 1, ...]}``."""
    from kvlab.models.builtin import cache_root

    safe = model.replace("/", "--").replace(":", "-")
    return cache_root() / "profiles" / f"{safe}-entropy.json"


def load_dense_layers(profile: str) -> list[int]:
    """Dense layers from an entropy profile given as a JSON path or a model name."""
    path = Path(profile).expanduser()
    if not (path.suffix == ".json" or path.is_file()):
        path = entropy_profile_path(profile)
    if not path.is_file():
        raise KVLabError(f"no entropy profile at {path}; create it with `kvlab profile entropy --model {profile}` "
                         f"(or pass dense_layers_profile=<path to a JSON file with \"dense_layers\">)")
    try:
        data = json.loads(path.read_text())
        layers = [int(x) for x in data["dense_layers"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise KVLabError(f"entropy profile {path} has no valid \"dense_layers\" list of ints ({exc})") from None
    return layers


# ---------------------------------------------------------------- the shared method base
@dataclass
class RoutingMethod(Method):
    """Base of the decode-time routers: the whole cache is kept, each step reads part of it.

    ``block_size`` tokens per block (a power of two, 1..256); block 0 .. ``sink_blocks - 1`` (attention
    sinks) and the newest ``local_blocks`` blocks are always read and count toward the budget.
    ``dense_layers``: an int n (the first n layers read densely), a comma list ``"0,1,5"``, or ``"auto"``
    (the layers an entropy profile names; ``dense_layers_profile`` is its JSON path or the model name).
    ``record_recall``: on each routed step also compute the attention-mass recall of the selection
    against full attention (a full attention pass per layer; appended to ``recall_log``).
    """

    block_size: int = 16
    sink_blocks: int = 1
    local_blocks: int = 2
    dense_layers: int | str | list[int] = 2
    dense_layers_profile: str | None = None
    record_recall: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        bs = self.block_size
        check(isinstance(bs, int) and 1 <= bs <= MAX_BLOCK_SIZE and bs & (bs - 1) == 0,
              f"block_size must be a power of two from 1 to {MAX_BLOCK_SIZE}, got {bs}")
        check(self.sink_blocks >= 0, f"sink_blocks must be >= 0, got {self.sink_blocks}")
        check(self.local_blocks >= 1, f"local_blocks must be >= 1 (the newest block is always read), "
                                      f"got {self.local_blocks}")
        self._dense_spec = self._parse_dense(self.dense_layers)
        if self._dense_spec == "auto":
            check(self.dense_layers_profile is not None,
                  "dense_layers=auto needs dense_layers_profile=<model name or path of an entropy profile JSON>; "
                  "create the profile with `kvlab profile entropy --model <model>`")
            self._dense_spec = load_dense_layers(self.dense_layers_profile)
        self.recall_log: list[dict[str, Any]] = []
        self._dense: set[int] | None = None
        self._calls: dict[int, int] = {}

    @staticmethod
    def _parse_dense(spec: Any) -> int | list[int] | str:
        if isinstance(spec, bool):
            raise KVLabError(f"dense_layers must be an int, a comma list of layers or 'auto', got {spec!r}")
        if isinstance(spec, int):
            check(spec >= 0, f"dense_layers must be >= 0, got {spec}")
            return spec
        if isinstance(spec, (list, tuple)):
            return [int(x) for x in spec]
        text = str(spec).strip().lower()
        if text == "auto":
            return "auto"
        try:
            if text.isdigit():
                return int(text)
            return [int(x) for x in text.split(",") if x.strip() != ""]
        except ValueError:
            raise KVLabError(f"dense_layers must be an int, a comma list of layers or 'auto', got {spec!r}") from None

    # ------------------------------------------------------------ setup
    def resolve_dense_layers(self, num_layers: int) -> set[int]:
        """The set of dense layers for a model of ``num_layers`` layers (validated)."""
        spec = self._dense_spec
        if isinstance(spec, int):
            check(spec <= num_layers, f"dense_layers={spec} is outside the model: allowed 0..{num_layers}")
            return set(range(spec))
        bad = [i for i in spec if not 0 <= i < num_layers]
        check(not bad, f"dense_layers index {bad[0] if bad else ''} is outside the model: "
                       f"allowed layers 0..{num_layers - 1}")
        return set(spec)

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        self.reset()
        self._scaling = ctx.scaling
        self._dense = self.resolve_dense_layers(store.num_layers)
        shortest = int(ctx.context_lengths.min())
        check(self.block_size <= shortest,
              f"block_size {self.block_size} is larger than the context ({shortest} tokens); "
              f"allowed: a power of two from 1 to {min(MAX_BLOCK_SIZE, shortest)}")
        for n in ctx.context_lengths.tolist():
            self.check_budget(int(n))

    def reset(self) -> None:
        """Forget all per-run state (called at the start of every decode)."""
        self._dense = None
        self._calls = {}
        self.recall_log = []

    def is_dense(self, layer_idx: int) -> bool:
        if self._dense is None:  # decode_plan used without prefill_end (benchmarks, tests)
            spec = self._dense_spec
            return layer_idx < spec if isinstance(spec, int) else layer_idx in spec
        return layer_idx in self._dense

    def next_step(self, layer_idx: int) -> int:
        """The decode step number of this call for ``layer_idx`` (0, 1, ...)."""
        step = self._calls.get(layer_idx, 0)
        self._calls[layer_idx] = step + 1
        return step

    def decode_plan(self, layer_idx: int, layer: LayerStore, query: torch.Tensor,
                    q_positions: torch.Tensor) -> ReadPlan | None:
        """The frame every router shares: a dense layer, or one whose rows are all within budget, reads
        everything (``None``); otherwise :meth:`select` picks what this step reads, and its attention
        recall is logged when ``record_recall`` is on."""
        if self.is_dense(layer_idx):
            return None
        step = self.next_step(layer_idx)
        budgets = self.row_budgets(layer.lengths)
        if bool((budgets >= layer.lengths).all()):
            return None
        plan = self.select(layer_idx, layer, query, step, budgets)
        self.record(layer_idx, step, layer, query, getattr(self, "_scaling", None), plan)
        return plan

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: int,
               budgets: torch.Tensor) -> ReadPlan:
        """What decode step ``step`` of a routed layer reads, given each row's token ``budgets``."""
        raise NotImplementedError

    # ------------------------------------------------------------ budget
    def forced_tokens(self, length: int) -> int:
        """Tokens the sink and local blocks take at ``length`` (at most the context)."""
        nb = -(-length // self.block_size)
        local_start = max(0, nb - self.local_blocks) * self.block_size
        sink_end = min(self.sink_blocks * self.block_size, length)
        return min(length, sink_end + length - max(local_start, sink_end))

    def row_budgets(self, lengths: torch.Tensor) -> torch.Tensor:
        """Tokens each row may read at its current length (rounded down, as :meth:`Method.tokens_kept`)."""
        if self.budget_tokens is not None:
            return torch.full_like(lengths, self.budget_tokens)
        return torch.floor(self.keep_fraction * lengths.double() + 1e-9).long().clamp(min=1)

    def check_budget(self, length: int) -> None:
        """A clear error when the budget cannot hold the sink and local blocks at ``length`` tokens."""
        budget = int(self.row_budgets(torch.tensor([length]))[0])
        if budget >= length:
            return  # dense fallback
        need = (self.sink_blocks + self.local_blocks) * self.block_size
        check(budget >= need,
              f"budget of {budget} tokens (context {length}) is smaller than sink_blocks + local_blocks = "
              f"{self.sink_blocks} + {self.local_blocks} blocks of {self.block_size} = {need} tokens; "
              f"allowed: a budget of at least {need} tokens (or fewer/smaller blocks)")

    def block_budgets(self, lengths: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """``(blocks per row, blocks read per row, dense rows)`` for rows of ``lengths`` tokens with token
        ``budgets``."""
        nb = ceil_div_tensor(lengths, self.block_size)
        dense = budgets >= lengths
        k = torch.where(dense, nb, torch.minimum(budgets // self.block_size, nb))
        need = self.sink_blocks + self.local_blocks
        if bool((~dense & (k < need)).any()):
            self.check_budget(int(lengths[~dense & (k < need)][0]))
        return nb, k, dense

    def forced_blocks(self, nb: torch.Tensor, width: int) -> torch.Tensor:
        """``[rows, width]`` bool: the sink blocks and the newest ``local_blocks`` blocks of each row
        (on ``nb``'s device)."""
        cols = torch.arange(width, device=nb.device)[None, :]
        return ((cols < self.sink_blocks) | (cols >= (nb - self.local_blocks)[:, None])) & (cols < nb[:, None])

    # ------------------------------------------------------------ diagnostic
    def record(self, layer_idx: int, step: int, layer: LayerStore, query: torch.Tensor, scaling: float | None,
               plan: ReadPlan | None) -> None:
        """Append the attention-mass recall of ``plan`` (``[B, Hq]``) to ``recall_log`` if asked for."""
        if not self.record_recall:
            return
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        recall = mass_recall(layer, query, scaling, plan)
        self.recall_log.append({"layer": layer_idx, "step": step, "recall": recall})


# ---------------------------------------------------------------- selection
def top_blocks(scores: torch.Tensor, nb: torch.Tensor, k: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
    """Per row the ``k`` best of its ``nb`` blocks by ``scores`` ``[rows, width]`` (forced ones first).

    Returns ascending block ids ``[rows, max k]``, -1 padded, on the device of ``scores``.
    """
    rows, width = scores.shape
    kmax = min(max(int(k.max()), 1), width)  # before k moves: no device sync for a CPU k
    device = scores.device
    nb, k = nb.to(device), k.to(device)
    s = scores.float().clone()
    cols = torch.arange(width, device=device)[None, :]
    if forced is not None:
        s = torch.where(forced.to(device), torch.inf, s)
    s = torch.where(cols < nb[:, None], s.nan_to_num(nan=-torch.inf), -torch.inf)
    top = s.topk(kmax, dim=1).indices
    keep = torch.arange(kmax, device=device)[None, :] < torch.minimum(k, nb)[:, None]
    big = torch.iinfo(torch.long).max
    idx = torch.where(keep, top, big).sort(1).values
    return torch.where(idx == big, -1, idx)


def grouped_query(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, Hq, L, D]`` -> ``[rows, G * L, D]`` float32 (query head ``h * G + g`` serves KV head ``h``)."""
    b, hq, length, d = query.shape
    return query.reshape(b * kv_heads, (hq // kv_heads) * length, d).float()


def rowwise_mv(mat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """``[rows, n, D] @ [rows, D] -> [rows, n]`` as one matrix-vector product per row.

    On the CPU ``torch.bmm`` with a single column is several times slower than ``torch.mv``; on a GPU
    one ``bmm`` launch is what is fast.
    """
    if mat.device.type != "cpu":
        return torch.bmm(mat.float(), vec.float()[:, :, None])[:, :, 0]
    out = torch.empty(mat.shape[0], mat.shape[1], dtype=torch.float32)
    for r in range(mat.shape[0]):
        torch.mv(mat[r], vec[r], out=out[r])
    return out


# ---------------------------------------------------------------- block metadata
class BlockMeta:
    """Centroid, min and max of the keys in every ``unit``-token block of each row of one layer.

    ``centroid``/``kmin``/``kmax``: ``[rows, blocks, D]`` float32 (a partial last block covers the
    tokens it has; an empty block has min +inf and max -inf). :meth:`update` recomputes only the blocks
    that gained tokens since the previous call, unless the store was repacked or replaced.
    """

    CHUNK_TOKENS = 4096

    def __init__(self, unit: int, need_bounds: bool = True, need_centroid: bool = True) -> None:
        self.unit = unit
        self.need_bounds = need_bounds
        self.need_centroid = need_centroid
        self.lengths: torch.Tensor | None = None
        self._key: tuple | None = None
        self.centroid = self.kmin = self.kmax = torch.empty(0)
        self.capacity = 0
        self.device = torch.device("cpu")  # the device of the keys summarised (set by update)
        self.blocks_recomputed = 0  # how many (row, block) entries the last update recomputed

    def update(self, layer: LayerStore) -> None:
        key = (layer.keys.data_ptr(), layer.keys.shape[0], tuple(layer.start.tolist()))
        self.device = layer.keys.device
        u = self.unit
        nb = int(ceil_div_tensor(layer.lengths.max(), u)) if layer.rows else 0
        rebuild = self._key != key or self.lengths is None or bool((layer.lengths < self.lengths).any())
        if rebuild:
            self._allocate(layer, nb)
            b0 = 0
        else:
            changed = layer.lengths != self.lengths
            if not bool(changed.any()):
                self.blocks_recomputed = 0
                return
            b0 = int((self.lengths[changed] // u).min())
            if nb > self.capacity:
                self._grow(nb)
        self._compute(layer, b0, nb)
        self.blocks_recomputed = (nb - b0) * layer.rows
        self.lengths = layer.lengths.clone()
        self._key = key

    def _allocate(self, layer: LayerStore, nb: int) -> None:
        shape = (layer.rows, nb + max(4, nb // 8), layer.head_dim)
        self.capacity = shape[1]
        dev = self.device
        self.centroid = torch.zeros(shape, device=dev) if self.need_centroid else torch.empty(0, device=dev)
        self.kmin = torch.full(shape, torch.inf, device=dev) if self.need_bounds else torch.empty(0, device=dev)
        self.kmax = torch.full(shape, -torch.inf, device=dev) if self.need_bounds else torch.empty(0, device=dev)

    def _grow(self, nb: int) -> None:
        self.capacity = nb + max(4, nb // 4)

        def grow(t: torch.Tensor, fill: float) -> torch.Tensor:
            if t.numel() == 0:
                return t
            out = torch.full((t.shape[0], self.capacity, t.shape[2]), fill, device=t.device)
            out[:, : t.shape[1]] = t
            return out

        self.centroid = grow(self.centroid, 0.0)
        self.kmin = grow(self.kmin, torch.inf)
        self.kmax = grow(self.kmax, -torch.inf)

    def _compute(self, layer: LayerStore, b0: int, b1: int) -> None:
        u, dev = self.unit, self.device
        lengths = layer.lengths.to(dev)
        base = layer.start.to(dev) * layer.block_size
        last = (lengths - 1).clamp(min=0)
        step = max(1, self.CHUNK_TOKENS // u)
        for c0 in range(b0, b1, step):
            c1 = min(b1, c0 + step)
            slots = torch.arange(c0 * u, c1 * u, device=dev)[None, :]
            valid = slots < lengths[:, None]  # [rows, S]
            phys = base[:, None] + torch.minimum(slots, last[:, None])
            k = layer.keys[phys].float().view(layer.rows, c1 - c0, u, -1)
            vm = valid.view(layer.rows, c1 - c0, u, 1)
            if self.need_centroid:
                cnt = vm.sum(2).clamp(min=1)
                self.centroid[:, c0:c1] = torch.where(vm, k, 0.0).sum(2) / cnt
            if self.need_bounds:
                self.kmin[:, c0:c1] = torch.where(vm, k, torch.inf).amin(2)
                self.kmax[:, c0:c1] = torch.where(vm, k, -torch.inf).amax(2)


# ---------------------------------------------------------------- true attention
def attention_mass(layer: LayerStore, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of each query head over each row's logical slots: ``[B, H_kv, G, T]``.

    ``T`` is the longest row (0 past a row's length); with several queries per row their mean.
    Every stored token is taken as visible (a decode step on a global layer).
    """
    b, hq, length, d = query.shape
    h = layer.kv_heads
    g = hq // h
    t = int(layer.lengths.max()) if layer.rows else 0
    out = torch.zeros(b, h, g, t, device=layer.keys.device)
    q = grouped_query(query, h)
    for row in range(layer.rows):
        bi, hi = divmod(row, h)
        k, _, _ = layer.row_view(row)
        p = torch.softmax((q[row] @ k.float().T) * scaling, dim=-1)  # [G * L, T_row]
        out[bi, hi, :, : k.shape[0]] = p.view(g, length, -1).mean(1)
    return out


def mass_recall(layer: LayerStore, query: torch.Tensor, scaling: float, plan: ReadPlan | None) -> torch.Tensor:
    """Share of each query head's true attention mass that ``plan`` reads: ``[B, Hq]`` (1 for ``None``)."""
    b, hq = query.shape[:2]
    if plan is None:
        return torch.ones(b, hq)
    mass = attention_mass(layer, query, scaling)  # [B, H, G, T]
    slots = plan.token_slots(layer.lengths.to(plan.index.device), layer.block_size)  # [B, H, n]
    slots = torch.where(slots < mass.shape[-1], slots, -1)
    idx = slots.clamp(min=0)[:, :, None, :].expand(*mass.shape[:3], slots.shape[-1])
    picked = mass.gather(-1, idx) * (slots >= 0)[:, :, None, :]
    return picked.sum(-1).reshape(b, hq)
