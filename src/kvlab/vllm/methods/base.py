"""An adapter per kvlab method: how the method runs inside vLLM, found by the method's class.

:func:`adapter` registers an :class:`Adapter` subclass for a kvlab method class; :func:`adapter_class`
finds the adapter of a class through its MRO, so an adapter registered for a base class serves every
subclass that has none of its own. An adapter answers, for one validated method and vLLM's page size:

- **configuration** (no vLLM import; ``kvlab serve`` asks before an engine starts): ``defaults`` (where
  vLLM's differ from kvlab's store), ``fixed`` (parameters vLLM runs with one value only), ``options`` (the
  adapter's own), ``page_tokens`` (the page size ``kvlab serve`` gives vLLM unless ``--block-size`` says),
  :meth:`Adapter.params` and :meth:`Adapter.validate` (the checks), :meth:`Adapter.describe` (the startup
  line), :meth:`Adapter.check_model`;
- its **role**: :data:`INERT` (vLLM as it is), :data:`ROUTES` (kvlab's attention backend picks the pages
  vLLM's kernel reads: :meth:`Adapter.step_plan`, :meth:`Adapter.routes_layer`, :meth:`Adapter.summaries`,
  :meth:`Adapter.select`) or :data:`EVICTS` (kvlab's worker and scheduler free vLLM's KV blocks:
  :meth:`Adapter.free_range`, :meth:`Adapter.agree` (the ranks' reports made one), :meth:`Adapter.plan`,
  :meth:`Adapter.after_attention`, :meth:`Adapter.after_forward`, and what the engine must be:
  :meth:`Adapter.prefix_cache_off`, :meth:`Adapter.group_per_layer`).

What runs is :func:`runnable` (every registered kvlab method whose class has an adapter); every other
method is refused in one line with the reason of its family (:data:`WHY_NOT`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvlab.errors import KVLabError, check
from kvlab.methods import METHODS, Method, make_method

if TYPE_CHECKING:
    from kvlab.vllm.eviction import EvictStep, LayerCall, Rows, WorkerState

INERT, ROUTES, EVICTS = "inert", "routes", "evicts"
BUDGET_KEYS = ("budget", "ratio", "budget_tokens")
# Why a kvlab family has no adapter (yet), as the refusal line says it.
WHY_NOT = {
    "routing": "vLLM's kernel reads whole pages through one block table per request; only block-route's page "
               "summaries and page plan are built",
    "eviction": "vLLM frees whole pages at a prompt's end (kv-compress) or behind a window (streaming); no "
                "adapter serves this method yet",
    "smaller vectors": "vLLM's pages hold full-width keys and values in one dtype, read by its own kernel",
    "architectural": "it changes which layers cache what, which vLLM's model code fixes",
}

ADAPTERS: dict[type[Method], type[Adapter]] = {}


def adapter(method_cls: type[Method]):
    """Class decorator: ``cls`` runs ``method_cls`` (and its subclasses without an adapter of their own)."""

    def register(cls: type[Adapter]) -> type[Adapter]:
        assert method_cls not in ADAPTERS, f"{method_cls.__name__} already has the adapter {ADAPTERS[method_cls]}"
        cls.serves = method_cls
        ADAPTERS[method_cls] = cls
        return cls

    return register


def adapter_class(method_cls: type[Method]) -> type[Adapter] | None:
    """The adapter of the nearest class in ``method_cls``'s MRO that has one (``None``: vLLM cannot run it)."""
    return next((ADAPTERS[c] for c in method_cls.__mro__ if c in ADAPTERS), None)


def runnable(role: str | None = None) -> list[str]:
    """The kvlab methods vLLM runs (those whose adapter has ``role``, when given), in kvlab's registry order."""
    found = ((name, cls, adapter_class(cls)) for name, cls in METHODS.items())
    return [name for name, method_cls, cls in found
            if cls is not None and cls.why_not(method_cls) is None and role in (None, cls.role)]


def why_not(method_cls: type[Method]) -> str | None:
    """Why vLLM cannot run ``method_cls`` (``None``: an adapter serves it)."""
    cls = adapter_class(method_cls)
    return WHY_NOT.get(method_cls.family, "no adapter serves it") if cls is None else cls.why_not(method_cls)


def serving(method_cls: type[Method]) -> type[Adapter]:
    """The adapter that serves ``method_cls``, or the one-line refusal saying why none does."""
    why = why_not(method_cls)
    if why is not None:
        raise KVLabError(f"method {method_cls.name!r} cannot run inside vLLM yet ({why}); vLLM runs: "
                         f"{', '.join(runnable())}")
    return adapter_class(method_cls)


def adapter_named(name: str) -> type[Adapter]:
    """The adapter of the kvlab method ``name``; one line naming what runs when there is none."""
    if name not in METHODS:
        raise KVLabError(f"unknown method {name!r}; vLLM runs: {', '.join(runnable())}")
    return serving(METHODS[name])


def adapter_for(method: Method, page_size: int) -> Adapter:
    """The adapter of a made method, by its class (not validated again: :meth:`Adapter.configure` validates)."""
    return serving(type(method))(method, page_size)


def budget_given(method: Method) -> bool:
    """Whether the user gave a budget (a fraction kept, a ratio removed, or tokens)."""
    return method.budget is not None or method.ratio is not None or method.budget_tokens is not None


class Adapter:
    """How one kvlab method runs inside vLLM. The base is inert: every hook leaves vLLM as it is."""

    serves: ClassVar[type[Method]] = Method  # set by @adapter
    role: ClassVar[str] = INERT
    defaults: ClassVar[dict[str, Any]] = {}  # parameter -> its value inside vLLM unless the user gives one
    fixed: ClassVar[dict[str, Any]] = {}  # parameter -> the only value vLLM runs
    options: ClassVar[dict[str, Any]] = {}  # the adapter's own parameters (how vLLM runs it) -> their defaults
    page_tokens: ClassVar[int] = 128  # the page size kvlab's commands give vLLM for this method (vLLM's CPU default)

    def __init__(self, method: Method, page_size: int, options: dict[str, Any] | None = None) -> None:
        self.method, self.page_size = method, page_size
        self.option = {**self.options, **(options or {})}

    @classmethod
    def why_not(cls, method_cls: type[Method]) -> str | None:
        """Why this adapter cannot serve ``method_cls`` after all (a subclass that does what it cannot), or
        ``None``: it serves it."""
        return None

    # ------------------------------------------------------------ configuration
    @classmethod
    def configure(cls, name: str, section: dict[str, Any], page_size: int, heads_apart: bool = True) -> Adapter:
        """Validate the user's parameters (the ``"kvlab"`` entry less ``method``) and make the method
        (``heads_apart``: the backend can read each KV head's own pages, as vLLM's CPU backend can)."""
        section = dict(section)
        for key, only in cls.fixed.items():
            if key in section:
                check(section[key] == only, f"{key}={section[key]!r} is not supported inside vLLM (only {only!r})")
        options = {key: section.pop(key) for key in list(section) if key in cls.options}
        for key, value in options.items():
            kind = type(cls.options[key])
            check(type(value) is kind, f"{key} takes a {kind.__name__}, got {value!r}")
        options = cls.backend_options(options, heads_apart)
        made = cls(make_method(name, **cls.params(section, page_size)), page_size, options)
        made.validate()
        return made

    @classmethod
    def backend_options(cls, given: dict[str, Any], heads_apart: bool) -> dict[str, Any]:
        """The adapter's options for a backend that can (``heads_apart``) or cannot read each KV head's own
        pages, from those the user gave. Default: as given."""
        return given

    @classmethod
    def params(cls, section: dict[str, Any], page_size: int) -> dict[str, Any]:
        """The method's parameters inside vLLM, checked before it is made. Default: ``defaults``, then the user's."""
        return {**cls.defaults, **section}

    def validate(self) -> None:
        """Checks on the made method (a budget where one is needed)."""

    def describe(self) -> dict[str, Any]:
        """The parameters that act inside vLLM besides the budget and page size (the startup line)."""
        return {}

    def check_model(self, num_layers: int) -> None:
        """Checks against the served model (``kvlab serve``, before vLLM starts)."""

    def check_ranks(self, ranks: int) -> None:
        """Checks against ``ranks`` tensor-parallel ranks, each holding its own KV heads (``kvlab serve`` before
        vLLM starts, and the engine)."""
        name = self.method.name
        check(ranks == 1 or not self.method.mixes_kv_heads,
              f"{name} chooses from the attention of every KV head of a layer, and over {ranks} tensor-parallel "
              f"ranks each rank holds only its own heads: serve {name} with --tensor-parallel-size 1")

    # ------------------------------------------------------------ what the engine must be
    def prefix_cache_off(self) -> str | None:
        """Why vLLM's prefix cache must be off (a verb phrase: "rewrites ..."), or ``None``: it may stay on."""
        return None

    def group_per_layer(self) -> str | None:
        """The setting that makes every layer its own KV-cache group (block table), or ``None``: one group."""
        return None

    # ------------------------------------------------------------ ROUTES: kvlab.vllm.backend
    def step_plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int, kv_heads: int
                  ) -> Any | None:
        """The host plan of one engine step (the first ``num_decodes`` rows decode; ``kv_heads`` in this
        rank's cache), or ``None``: vLLM's call."""
        return None

    def head_groups(self, kv_heads: int) -> int:
        """Groups of KV heads that read their own pages (one kernel call each): 1, or ``kv_heads``."""
        return 1

    def routes_layer(self, layer: int, num_layers: int) -> bool:
        """Whether layer ``layer`` of ``num_layers`` reads part of the cache."""
        return False

    def summaries(self, num_blocks: int, kv_heads: int, head_size: int, device: torch.device,
                  dtype: torch.dtype) -> Any:
        """A routed layer's page summaries over vLLM's ``num_blocks`` physical blocks."""
        raise NotImplementedError

    def select(self, query: torch.Tensor, plan: Any, summaries: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(physical, logical)`` pages each decode request reads in this layer."""
        raise NotImplementedError

    # ------------------------------------------------------------ EVICTS: kvlab.vllm.eviction / engine
    def free_range(self, n: int, processed: int, reported: Any) -> tuple[int, int] | None:
        """Pages ``[first, last)`` of a request with an ``n``-token prompt the scheduler frees once
        ``processed`` tokens are committed (``reported``: what the worker last reported of it, ``None`` before:
        kv-compress's kept pages, a held scorer's ``(kept pages, last compaction)``)."""
        return None

    def agree(self, reported: list[Any]) -> Any:
        """What every rank reported of one request and group, made one (tensor parallel): what frees only pages
        no rank reads. Default: the most pages kept."""
        return max(reported)

    def plan(self, state: WorkerState, rows: Rows, table: torch.Tensor, seq_lens: torch.Tensor, group: int
             ) -> tuple[EvictStep | None, torch.Tensor, torch.Tensor]:
        """The worker's plan of one step for one KV-cache group, and the block table / ``seq_lens`` vLLM's
        kernel reads."""
        return None, table, seq_lens

    def after_attention(self, state: WorkerState, step: EvictStep, call: LayerCall) -> None:
        """Per layer, after vLLM's kernel wrote the layer's output."""

    def after_forward(self, state: WorkerState) -> None:
        """After the forward, when a layer left work in ``state.pending``."""
