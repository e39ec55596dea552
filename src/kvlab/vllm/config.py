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
(docs/vllm.md says why). This module imports nothing from vLLM: ``kvlab serve`` validates with it before
an engine starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.methods import METHODS, Method, make_method

CONFIG_KEY = "kvlab"
SUPPORTED_METHODS = ("full", "block-route", "streaming", "kv-compress")  # what vLLM can run
EVICTION_METHODS = ("streaming", "kv-compress")  # the methods that free vLLM's KV blocks
DEFAULT_PAGE_SIZE = 128  # vLLM's CPU default block size
# Defaults that differ from kvlab's own store (16-token blocks). block-route: vLLM's pages are 128 tokens,
# so one sink page and the newest page already cover the 256 tokens kvlab's defaults protect; sub-pages of
# 16 tokens score at kvlab's granularity; and Quest's bound, not the centroid, because one page list serves
# every KV head (docs/vllm.md: on a 5.6K-token needle at 1/8 the bound found 4 of 4 keys, the centroid 2).
# kv-compress: one kept length per request (docs/vllm.md: why not per layer by default, never per head).
VLLM_DEFAULTS = {"block-route": {"local_blocks": 1, "score_block": 16, "score": "bound"},
                 "streaming": {}, "kv-compress": {"rates": "uniform"}}
# parameter -> the only value vLLM runs
UNSUPPORTED_PARAMS = {"block-route": {"refresh": 1, "record_recall": False},
                      "streaming": {"compact_every": 32},
                      "kv-compress": {"interval": None, "max_cache_tokens": None}}
VLLM_RATES = ("uniform", "layer")
# The worker and scheduler classes eviction runs with (kvlab.vllm.engine; named here, imported only by vLLM).
WORKER_CLS = "kvlab.vllm.engine.KVLabCPUWorker"
SCHEDULER_CLS = "kvlab.vllm.engine.KVLabScheduler"


@dataclass(frozen=True)
class ServeConfig:
    """A validated kvlab configuration for one vLLM engine."""

    method: Method
    page_size: int

    @property
    def routing(self) -> bool:
        """Whether the plugin does anything (``full`` leaves vLLM as it is)."""
        return self.method.name != "full"

    @property
    def evicts(self) -> bool:
        """Whether the method frees vLLM's KV blocks (streaming, kv-compress)."""
        return self.method.name in EVICTION_METHODS

    @property
    def rates(self) -> str:
        """kv-compress's kept lengths: one per request (``uniform``) or per layer (``layer``)."""
        return getattr(self.method, "rates", "uniform")

    def describe(self) -> dict[str, Any]:
        """The method and every parameter that acts inside vLLM (the startup log line)."""
        d = self.method.describe()
        if not self.routing:
            return {"method": "full"}
        out = {"method": d["method"]}
        for key in ("budget", "ratio", "budget_tokens"):
            if d.get(key) is not None:
                out[key] = d[key]
        out["page_size"] = self.page_size
        if self.method.name == "block-route":
            out.update(score=d["score"], score_block=self.method._sub, sink_blocks=d["sink_blocks"],
                       local_blocks=d["local_blocks"], dense_layers=d["dense_layers"])
        elif self.method.name == "streaming":
            out.update(n_sink=d["n_sink"], window=d["window"])
        else:
            out.update(rates=d["rates"], window=d["window"], protected=d["protected"], n_sink=d["n_sink"],
                       pool_kernel=d["pool_kernel"], aggregation=d["aggregation"])
        return out

    def log_line(self) -> str:
        d = self.describe()
        rest = " ".join(f"{k}={v}" for k, v in d.items() if k != "method")
        return f"kvlab: method {d['method']}" + (f" ({rest})" if rest else " (vLLM's attention, plugin inert)")

    def additional_config(self) -> dict[str, Any]:
        """The ``--additional-config`` value that reproduces this configuration."""
        params = {f.name: getattr(self.method, f.name) for f in self.method.parameters()}
        defaults = {f.name: f.default for f in self.method.parameters()}
        body = {k: v for k, v in params.items() if v != defaults[k] or k in VLLM_DEFAULTS.get(self.method.name, {})}
        body.pop("block_size", None)
        return {CONFIG_KEY: {"method": self.method.name, **body}}


def parse(section: Any, page_size: int) -> ServeConfig:
    """Validate the ``"kvlab"`` section of ``additional_config`` for an engine with ``page_size``-token pages.

    Raises :class:`~kvlab.errors.KVLabError` with one line for an unknown or unsupported method, an
    unknown parameter, a budget out of range, a page size / ``score_block`` that does not divide, or a
    kv-compress ``rates`` vLLM cannot keep.
    """
    if isinstance(section, str):
        try:
            section = json.loads(section)
        except ValueError as exc:
            raise KVLabError(f"the kvlab configuration is not valid JSON ({exc})") from None
    section = dict(section or {})
    check(all(isinstance(k, str) for k in section), "kvlab configuration keys must be parameter names")
    name = section.pop("method", "full")
    if name not in METHODS:
        raise KVLabError(f"unknown method {name!r}; vLLM runs: {', '.join(SUPPORTED_METHODS)}")
    if name not in SUPPORTED_METHODS:
        raise KVLabError(f"method {name!r} cannot run inside vLLM yet; vLLM runs: {', '.join(SUPPORTED_METHODS)}")
    check(isinstance(page_size, int) and page_size >= 32 and page_size % 32 == 0,
          f"vLLM's page size (--block-size) must be a multiple of 32 on the CPU, got {page_size}")
    if name == "full":
        allowed = {"budget", "ratio", "budget_tokens"}
        extra = sorted(set(section) - allowed)
        check(not extra, f"method 'full' takes no parameter {', '.join(extra)}")
        return ServeConfig(make_method("full", **section), page_size)
    for key, only in UNSUPPORTED_PARAMS[name].items():
        if key in section:
            check(section[key] == only, f"{key}={section[key]!r} is not supported inside vLLM (only {only!r})")
    if name in EVICTION_METHODS:
        return _eviction(name, section, page_size)
    if "block_size" in section:
        check(section.pop("block_size") == page_size,
              f"block-route reads vLLM's pages: block_size must equal vLLM's page size (--block-size {page_size})")
    params = {**VLLM_DEFAULTS[name], **section, "block_size": page_size}
    check(page_size & (page_size - 1) == 0,
          f"block-route needs a power-of-two page size (32, 64, 128 or 256), got --block-size {page_size}")
    sb = params.get("score_block")
    if isinstance(sb, int) and sb >= 1 and page_size % sb != 0:
        raise KVLabError(f"score_block {sb} does not divide the page size {page_size}; "
                         f"allowed: a power of two from 1 to {page_size}")
    method = make_method(name, **params)
    check(method.budget is not None or method.ratio is not None or method.budget_tokens is not None,
          "block-route needs a budget: give budget (fraction read, e.g. 0.125), ratio or budget_tokens")
    return ServeConfig(method, page_size)


def _eviction(name: str, section: dict[str, Any], page_size: int) -> ServeConfig:
    rates = section.get("rates", VLLM_DEFAULTS[name].get("rates"))
    if name == "kv-compress":
        check(rates in VLLM_RATES,
              f"rates={rates!r} cannot run inside vLLM: its block table is per request and KV-cache group and a page "
              f"holds every KV head of a layer, so kept lengths can vary per layer at most; allowed: "
              f"{', '.join(VLLM_RATES)}")
    method = make_method(name, **{**VLLM_DEFAULTS[name], **section})
    given = method.budget is not None or method.ratio is not None or method.budget_tokens is not None
    check(given or getattr(method, "window", None) is not None and name == "streaming",
          f"{name} needs a budget: give budget (fraction kept, e.g. 0.25), ratio or budget_tokens"
          + (" (or window)" if name == "streaming" else ""))
    return ServeConfig(method, page_size)


def from_vllm_config(vllm_config: Any) -> ServeConfig | None:
    """The kvlab configuration of an engine, or ``None`` when its ``additional_config`` has no kvlab entry."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict) or CONFIG_KEY not in extra:
        return None
    page_size = int(vllm_config.cache_config.block_size)
    return parse(extra[CONFIG_KEY], page_size)
