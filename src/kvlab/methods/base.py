"""The method interface: one small dataclass per method, registered by name.

A method may act at four points, and each is optional:

- :meth:`Method.prefill_end` -- once, when the prompt is in the store: evict what it will not keep
  (SnapKV, StreamingLLM, KV-Compress, ...). It sees the last ``observation_window()`` queries of
  every layer.
- :meth:`Method.plan_step` -- on the host, once per decode step, before the step runs: decide from
  the store's host copies what the step will do (a router's budgets and read widths; an evicting
  method's compaction every few steps), and return it as a :class:`StepPlan`, a value the driver
  hands down to every layer's attention for that step (nothing is left on the method).
- :meth:`Method.decode_plan` -- every decode step, every layer, on the device: choose, as the step's
  plan says, which blocks or tokens the step reads (block routing, cluster routing, oracles).
  ``None`` reads everything.
- :meth:`Method.step_end` -- after every decode step, on the device: evict during decode (mark the
  evicted slots dead; :meth:`plan_step` compacts them away every few steps).

A method whose ``decode_plan`` and ``step_end`` only launch device work of fixed shapes -- no read
of a device value into Python, no per-step Python state -- says so with :meth:`Method.graph_safe`,
and ``decode`` then captures its steps in CUDA graphs.

One vocabulary across methods: ``budget`` is the fraction of the context kept (or read), ``ratio``
the fraction removed (kvpress's ``compression_ratio``); they are one number, ``budget = 1 - ratio``.
``budget_tokens`` gives the budget as a token count instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import KVLabError, check


@dataclass
class PrefillContext:
    """What a method may use from prefill."""

    context_lengths: torch.Tensor  # [B] prompt tokens per sequence (padding excluded)
    queries: dict[int, torch.Tensor]  # layer -> [B, Hq, w, D] last w post-RoPE queries
    scaling: float
    num_query_heads: int
    model: Any = None  # the model being decoded (its RoPE, config, name), for methods that need it


@dataclass
class StepContext:
    """What a method may use after a decode step."""

    step: int  # 0 for the first decode step (in a replayed CUDA graph: the step it was captured at)
    positions: torch.Tensor  # [B] position of the token just decoded
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Hq, 1, D], if observed


@dataclass(frozen=True)
class StepPlan:
    """One decode step, decided on the host before it runs, and handed down the call chain to every layer.

    The driver fills in what it decides -- the step's number, how many tokens it appends to each row
    (``new_tokens``: 1 for a decode step, more for a chunk of forced tokens, 0 for a plan of what a layer
    already holds), the kernel path resolved once per decode (``triton``) -- and the method's
    :meth:`Method.plan_step` adds its plan of each layer (``layers``: a router's
    :class:`~kvlab.methods.routing.RoutePlan`, ``None`` where a layer reads everything).
    """

    step: int = 0
    new_tokens: int = 1
    triton: bool = False
    layers: Mapping[int, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """The kernel backend every kernel of the step runs on (``"triton"`` or ``"torch"``)."""
        return "triton" if self.triton else "torch"

    @property
    def signature(self) -> Hashable:
        """What the step's device work depends on: a CUDA graph of the step is replayed while it stays the same."""
        return self.new_tokens, self.triton, tuple((i, getattr(p, "signature", p)) for i, p in self.layers.items())


@dataclass
class Method:
    """Base class. Subclasses are dataclasses that add their own parameters and override hooks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    family: ClassVar[str] = ""  # one of FAMILIES: what kind of method it is (tables group by it)
    compresses: ClassVar[bool] = True  # False for methods that never drop or skip anything ("full")
    mixes_kv_heads: ClassVar[bool] = False  # its choice for one KV head reads the other heads' attention (TOVA)

    budget: float | None = None
    ratio: float | None = None
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            check(0 < self.budget <= 1, f"budget must be in (0, 1] (the fraction kept), got {self.budget}")
        if self.ratio is not None:
            check(0 <= self.ratio < 1, f"ratio must be in [0, 1) (the fraction removed), got {self.ratio}")
        if self.budget is not None and self.ratio is not None:
            check(abs(self.budget + self.ratio - 1) < 1e-9,
                  f"budget {self.budget} and ratio {self.ratio} disagree: budget = 1 - ratio; give one of them")
        if self.budget_tokens is not None:
            check(self.budget_tokens > 0, f"budget_tokens must be a positive token count, got {self.budget_tokens}")

    # ------------------------------------------------------------ budget
    @property
    def keep_fraction(self) -> float:
        """The budget as a fraction kept (1.0 when neither budget nor ratio was given)."""
        if self.budget is not None:
            return self.budget
        if self.ratio is not None:
            return 1.0 - self.ratio
        return 1.0

    def tokens_kept(self, context_length: int) -> int:
        """How many of ``context_length`` tokens the budget keeps (at least one).

        Rounded down, as kvpress does (``int(T * (1 - compression_ratio))``), so methods shared with
        kvpress keep exactly the same number of tokens.
        """
        if self.budget_tokens is not None:
            check(self.budget_tokens <= context_length,
                  f"budget of {self.budget_tokens} tokens is larger than the context ({context_length} tokens)")
            return self.budget_tokens
        return max(1, int(self.keep_fraction * context_length))

    # ------------------------------------------------------------- hooks
    def observation_window(self) -> int:
        """How many of the last prefill queries per layer :meth:`prefill_end` needs (0: none)."""
        return 0

    def observes_decode_queries(self) -> bool:
        """Whether :meth:`step_end` needs each step's queries."""
        return False

    def prefill_end(self, store: KVStore, ctx: PrefillContext) -> None:
        """Evict from the store after prefill. Default: keep everything."""

    def decode_reserve(self, tokens: int) -> int:
        """Slots per row to reserve before a decode of ``tokens`` steps (a method that holds the cache at
        a fixed size needs fewer). Default: ``tokens``."""
        return tokens

    def plan_step(self, store: KVStore, step: StepPlan) -> StepPlan:
        """The host side of decode step ``step`` (what the driver decided), made before the step appends its
        tokens, from the store's host copies only: host upkeep, and the method's plan of each layer, returned
        as the completed :class:`StepPlan`. Default: nothing to plan."""
        return step

    def decode_plan(self, layer_idx: int, layer: LayerStore, query: torch.Tensor, step: StepPlan) -> ReadPlan | None:
        """Which part of ``layer`` the decode step ``step`` (from :meth:`plan_step`) reads: device work only.
        Default: everything."""
        return None

    def step_end(self, store: KVStore, ctx: StepContext) -> None:
        """Evict after a decode step. Default: nothing."""

    def decode_end(self, store: KVStore) -> None:
        """After the last decode step (compact what was marked dead, so the store holds what was kept)."""

    def evicts_during_decode(self) -> bool:
        """Whether the method has a :meth:`step_end` (it changes the cache after each decode step, so a step may
        append only one token)."""
        return type(self).step_end is not Method.step_end

    def graph_safe(self) -> bool:
        """Whether a decode step with this method may be captured in a CUDA graph: ``decode_plan`` and
        ``step_end`` launch only fixed-shape device work and keep no per-step Python state. Default:
        true for a method that has neither hook (its decode is plain decode)."""
        return type(self).decode_plan is Method.decode_plan and not self.evicts_during_decode()

    # ----------------------------------------------------------- describe
    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in self.parameters()}}


METHODS: dict[str, type[Method]] = {}
# What a method does to the cache: the uncompressed reference; routing (keep everything, read part of it
# at each decode step); eviction (drop tokens); smaller vectors (keep every token in fewer bytes);
# architectural (change which layers cache what). Tables list the methods in this order.
FAMILIES = ("reference", "routing", "eviction", "smaller vectors", "architectural")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    assert cls.name and cls.name not in METHODS, f"duplicate or empty method name {cls.name!r}"
    assert cls.family in FAMILIES, f"method {cls.name!r} needs a family, one of {FAMILIES}, got {cls.family!r}"
    METHODS[cls.name] = cls
    return cls


def by_family() -> list[type[Method]]:
    """The registered methods grouped by family (in :data:`FAMILIES` order), each family in registration
    order (the import order of :mod:`kvlab.methods`)."""
    return sorted(METHODS.values(), key=lambda cls: FAMILIES.index(cls.family))


def make_method(name: str, **params: Any) -> Method:
    """Build a registered method; unknown names and parameters get one clear error."""
    if name not in METHODS:
        raise KVLabError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = {f.name for f in cls.parameters()}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise KVLabError(f"method {name!r} has no parameter {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    try:
        return cls(**params)
    except TypeError as exc:  # a wrongly typed value
        raise KVLabError(f"bad parameters for method {name!r}: {exc}") from None
