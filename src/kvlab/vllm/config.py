"""What a user asks kvlab to do inside vLLM, validated once, in the words of kvlab's own methods.

The request arrives as the ``"kvlab"`` entry of vLLM's ``--additional-config`` JSON
(``VllmConfig.additional_config``), e.g. ``{"kvlab": {"method": "block-route", "budget": 0.125}}``.
Its keys are the method's own parameter names (``kvlab methods``), and the method's own dataclass
checks them (budget/ratio/budget_tokens from :class:`kvlab.methods.base.Method`, ``score``,
``score_block``, ``sink_blocks``, ``local_blocks``, ``dense_layers`` from ``block-route``), so a value
means the same thing in ``kvlab generate`` and in ``kvlab serve``.

Inside vLLM a *page* is one of vLLM's KV blocks (``--block-size``, 128 tokens by default on the CPU):
block-route reads whole pages, so its ``block_size`` is vLLM's page size, and ``score_block`` scores
sub-pages inside it. The eviction methods (``streaming``, ``kv-compress``) free whole pages; kv-compress
keeps whole pages per request (``rates="uniform"``) or per layer (``rates="layer"``), never per KV head
(docs/vllm.md says why). What each method checks, fixes and defaults to inside vLLM is its adapter's
(:mod:`kvlab.vllm.methods`). This module imports nothing from vLLM: ``kvlab serve`` validates with it
before an engine starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.methods import Method
from kvlab.vllm.methods import EVICTS, INERT, Adapter, adapter_named
from kvlab.vllm.methods.base import BUDGET_KEYS

CONFIG_KEY = "kvlab"
DEFAULT_PAGE_SIZE = 128  # vLLM's CPU default block size
# The worker and scheduler classes eviction runs with (kvlab.vllm.engine; named here, imported only by vLLM).
WORKER_CLS = "kvlab.vllm.engine.KVLabCPUWorker"
SCHEDULER_CLS = "kvlab.vllm.engine.KVLabScheduler"


@dataclass(frozen=True)
class ServeConfig:
    """A validated kvlab configuration for one vLLM engine, and the adapter that runs its method."""

    method: Method
    page_size: int
    adapter: Adapter = field(compare=False, repr=False)

    @property
    def active(self) -> bool:
        """Whether the plugin does anything (an inert method, ``full``, leaves vLLM as it is)."""
        return self.adapter.role != INERT

    @property
    def evicts(self) -> bool:
        """Whether the method frees vLLM's KV blocks (with kvlab's worker and scheduler)."""
        return self.adapter.role == EVICTS

    def describe(self) -> dict[str, Any]:
        """The method and every parameter that acts inside vLLM (the startup log line)."""
        d = self.method.describe()
        if not self.active:
            return {"method": d["method"]}
        out = {"method": d["method"], **{k: d[k] for k in BUDGET_KEYS if d.get(k) is not None}}
        out["page_size"] = self.page_size
        return {**out, **self.adapter.describe()}

    def log_line(self) -> str:
        d = self.describe()
        rest = " ".join(f"{k}={v}" for k, v in d.items() if k != "method")
        return f"kvlab: method {d['method']}" + (f" ({rest})" if rest else " (vLLM's attention, plugin inert)")

    def additional_config(self) -> dict[str, Any]:
        """The ``--additional-config`` value that reproduces this configuration."""
        params = {f.name: getattr(self.method, f.name) for f in self.method.parameters()}
        defaults = {f.name: f.default for f in self.method.parameters()}
        body = {k: v for k, v in params.items() if v != defaults[k] or k in self.adapter.defaults}
        body.pop("block_size", None)
        options = {k: v for k, v in self.adapter.option.items() if v != self.adapter.options[k]}
        return {CONFIG_KEY: {"method": self.method.name, **body, **options}}


def parse(section: Any, page_size: int, heads_apart: bool = True) -> ServeConfig:
    """Validate the ``"kvlab"`` section of ``additional_config`` for an engine with ``page_size``-token pages
    (``heads_apart``: its attention backend can read each KV head's own pages; vLLM's CPU backend can).

    Raises :class:`~kvlab.errors.KVLabError` with one line for an unknown method or one no adapter runs, an
    unknown parameter, a budget out of range, or what the method's adapter refuses (a page size /
    ``score_block`` that does not divide, a kv-compress ``rates`` vLLM cannot keep, ...).
    """
    if isinstance(section, str):
        try:
            section = json.loads(section)
        except ValueError as exc:
            raise KVLabError(f"the kvlab configuration is not valid JSON ({exc})") from None
    section = dict(section or {})
    check(all(isinstance(k, str) for k in section), "kvlab configuration keys must be parameter names")
    name = section.pop("method", "full")
    cls = adapter_named(name)
    check(isinstance(page_size, int) and page_size >= 32 and page_size % 32 == 0,
          f"vLLM's page size (--block-size) must be a multiple of 32 on the CPU, got {page_size}")
    adapter = cls.configure(name, section, page_size, heads_apart)
    return ServeConfig(adapter.method, page_size, adapter)


def from_vllm_config(vllm_config: Any, heads_apart: bool = True) -> ServeConfig | None:
    """The kvlab configuration of an engine, or ``None`` when its ``additional_config`` has no kvlab entry."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict) or CONFIG_KEY not in extra:
        return None
    page_size = int(vllm_config.cache_config.block_size)
    return parse(extra[CONFIG_KEY], page_size, heads_apart)
