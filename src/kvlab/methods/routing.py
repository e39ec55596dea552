"""The routing base: what every decode-time router shares (block-route, cluster-route, the oracles).

:class:`RoutingMethod` holds the parameters every router takes (block size, sink and local blocks, dense
layers, the recall diagnostic), the budget arithmetic, and the plan/run split: a :class:`RoutePlan` per
layout on the host once per step (:meth:`RoutingMethod.plan_step`, carried in the step's
:class:`~kvlab.methods.base.StepPlan`), then a fixed-width selection per layer on the device
(:meth:`RoutingMethod.select`, the one thing a router implements).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.attention.probs import mass_recall
from kvlab.cache.store import KVStore, LayerStore, ceil_div, ceil_div_tensor
from kvlab.errors import KVLabError, check
from kvlab.files import load_dense_layers
from kvlab.kernels import selection
from kvlab.methods.base import Method, PrefillContext, StepPlan

MAX_BLOCK_SIZE = 256


# ---------------------------------------------------------------- the host plan of a routed layer
@dataclass(frozen=True)
class RoutePlan:
    """What a routed layer reads at one decode step, decided on the host (:meth:`RoutingMethod.host_plan`).

    ``lengths`` / ``budgets``: each row's tokens at the step and its token budget; ``width``: the fixed
    width of the selection (blocks, or tokens for a token router), a bound over the layer's capacity, so
    every step of a decode has the same shapes; ``reselect``: ``False`` on the steps between
    ``refresh`` re-selections. ``signature`` is what the step's device work depends on.
    """

    step: int
    lengths: tuple[int, ...]
    budgets: tuple[int, ...]
    width: int
    reselect: bool = True

    @property
    def signature(self) -> tuple:
        return self.width, self.reselect


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

    Plan on the host, select on the device: :meth:`plan_step` makes one :class:`RoutePlan` per layout
    (layers holding the same lengths share it) from the store's host copies, before the step, and returns
    them in the step's :class:`~kvlab.methods.base.StepPlan`; :meth:`decode_plan` -- the frame every
    router shares -- then only launches the router's :meth:`select` for a layer the plan routes (dense
    layers and layers whose rows are all within budget read everything).
    """

    family: ClassVar[str] = "routing"

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
        lengths = [int(n) for n in ctx.context_lengths.tolist()]
        shortest = min(lengths)
        check(self.block_size <= shortest,
              f"block_size {self.block_size} is larger than the context ({shortest} tokens); "
              f"allowed: a power of two from 1 to {min(MAX_BLOCK_SIZE, shortest)}")
        for n in lengths:
            self.check_budget(n)

    def reset(self) -> None:
        """Forget all per-run state (called at the start of every decode)."""
        self._dense = None
        self.recall_log = []

    def graph_safe(self) -> bool:
        return not self.record_recall

    def is_dense(self, layer_idx: int) -> bool:
        if self._dense is None:  # planned without prefill_end (benchmarks, tests)
            spec = self._dense_spec
            return layer_idx < spec if isinstance(spec, int) else layer_idx in spec
        return layer_idx in self._dense

    # ------------------------------------------------------------ plan (host) and run (device)
    def plan_step(self, store: KVStore, step: StepPlan) -> StepPlan:
        """One :class:`RoutePlan` per layout for the step, for the lengths it attends over (each row's tokens
        plus the ``step.new_tokens`` it appends), in the returned plan's ``layers``."""
        plans: dict[int, RoutePlan | None] = {}
        shared: dict[tuple, RoutePlan | None] = {}
        for i in store.compressible_layers():
            if self.is_dense(i):
                continue
            layer = store.layers[i]
            key = (tuple(layer.capacity_host), tuple(layer.lengths_host))
            if key not in shared:
                shared[key] = self.host_plan(layer, step.step, [n + step.new_tokens for n in layer.lengths_host])
            if shared[key] is not None:
                self.prepare_layer(i, layer, shared[key])
            plans[i] = shared[key]
        return dataclasses.replace(step, layers=plans)

    def decode_plan(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: StepPlan) -> ReadPlan | None:
        """The frame every router shares: a layer the step does not route (dense, or every row within budget)
        reads everything (``None``); otherwise :meth:`select` picks what it reads, and its attention recall
        is logged when ``record_recall`` is on."""
        plan = step.layers.get(layer_idx)
        if plan is None:
            return None
        read = self.select(layer_idx, layer, query, plan, step.backend)
        self.record(layer_idx, plan.step, layer, query, getattr(self, "_scaling", None), read)
        return read

    def host_plan(self, layer: LayerStore, step: int, lengths: list[int]) -> RoutePlan | None:
        """The plan of a routed layer at ``lengths`` (host ints), or ``None`` when every row is within budget."""
        budgets = [self.row_budget(n) for n in lengths]
        if all(b >= n for b, n in zip(budgets, lengths, strict=True)):
            return None
        for n in {n for b, n in zip(budgets, lengths, strict=True) if b < n}:
            self.check_budget(n)
        return RoutePlan(step, tuple(lengths), tuple(budgets), self.read_width(layer, lengths, budgets))

    def read_width(self, layer: LayerStore, lengths: list[int], budgets: list[int]) -> int:
        """The selection's fixed width (blocks): the most any row may read at any length up to the
        layer's capacity (a row reads its budget's blocks, or all of its blocks while within budget)."""
        bs = self.block_size

        def blocks(n: int) -> int:
            return ceil_div(n, bs) if self.row_budget(n) >= n else min(self.row_budget(n) // bs, ceil_div(n, bs))

        points = set(lengths) | {c * layer.block_size for c in layer.capacity_host}
        if self.budget_tokens is not None:  # the longest row still within budget reads all its blocks
            points.add(min(self.budget_tokens, max(points)))
        return max(1, max(blocks(n) for n in points))

    def prepare_layer(self, layer_idx: int, layer: LayerStore, plan: RoutePlan) -> None:
        """Host-side preparation of a routed layer before its step (per-layer state sized to the plan, brought
        up to what the layer holds)."""

    def select(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, plan: RoutePlan,
               backend: str) -> ReadPlan:
        """What decode step ``plan.step`` of a routed layer reads (device work only, on ``backend``'s kernels)."""
        raise NotImplementedError

    # ------------------------------------------------------------ budget
    def forced_tokens(self, length: int) -> int:
        """Tokens the sink and local blocks take at ``length`` (at most the context)."""
        nb = -(-length // self.block_size)
        local_start = max(0, nb - self.local_blocks) * self.block_size
        sink_end = min(self.sink_blocks * self.block_size, length)
        return min(length, sink_end + length - max(local_start, sink_end))

    def row_budget(self, length: int) -> int:
        """Tokens a row of ``length`` tokens may read (rounded down, as :meth:`Method.tokens_kept`)."""
        if self.budget_tokens is not None:
            return self.budget_tokens
        return max(1, math.floor(self.keep_fraction * length + 1e-9))

    def row_budgets(self, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`row_budget` of every row of ``lengths`` (a tensor, wherever it is: no read-back)."""
        if self.budget_tokens is not None:
            return torch.full_like(lengths, self.budget_tokens)
        return torch.floor(self.keep_fraction * lengths.double() + 1e-9).long().clamp(min=1)

    def blocks_read(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(blocks per row, blocks read per row)`` at ``lengths`` (device): a row within budget reads all."""
        nb = ceil_div_tensor(lengths, self.block_size)
        budgets = self.row_budgets(lengths)
        return nb, torch.where(budgets >= lengths, nb, torch.minimum(budgets // self.block_size, nb))

    def check_budget(self, length: int) -> None:
        """A clear error when the budget cannot hold the sink and local blocks at ``length`` tokens."""
        budget = self.row_budget(length)
        if budget >= length:
            return  # dense fallback
        need = (self.sink_blocks + self.local_blocks) * self.block_size
        check(budget >= need,
              f"budget of {budget} tokens (context {length}) is smaller than sink_blocks + local_blocks = "
              f"{self.sink_blocks} + {self.local_blocks} blocks of {self.block_size} = {need} tokens; "
              f"allowed: a budget of at least {need} tokens (or fewer/smaller blocks)")

    def forced_blocks(self, nb: torch.Tensor, width: int, block_size: int = 1) -> torch.Tensor:
        """``[rows, width]`` bool: the sink blocks and the newest ``local_blocks`` blocks of each row of ``nb``
        blocks (per token of them with ``block_size``; on ``nb``'s device)."""
        return selection.forced_blocks(nb, width, self.sink_blocks, self.local_blocks, block_size)

    # ------------------------------------------------------------ diagnostic
    def record(self, layer_idx: int, step: int, layer: LayerStore, query: torch.Tensor, scaling: float | None,
               plan: ReadPlan | None) -> None:
        """Append the attention-mass recall of ``plan`` (``[B, Hq]``) to ``recall_log`` if asked for."""
        if not self.record_recall:
            return
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        recall = mass_recall(layer, query, scaling, plan)
        self.recall_log.append({"layer": layer_idx, "step": step, "recall": recall})
