"""A throw-away kvlab method and its vLLM adapter, in one file (imported by test_adapters.py, which unregisters
both afterwards): the first ``n_sink`` tokens plus a fixed window of ``window`` tokens, served inside vLLM with
streaming's eviction as it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvlab.methods import Method, register
from kvlab.vllm.methods import adapter
from kvlab.vllm.methods.streaming import StreamingAdapter


@register
@dataclass
class SinkWindow(Method):
    """Sinks plus a fixed recent window (StreamingLLM's rule with the window given, no budget)."""

    name: ClassVar[str] = "test-sink-window"
    summary: ClassVar[str] = "test only: n_sink first tokens + a fixed window"
    family: ClassVar[str] = "eviction"

    n_sink: int = 4
    window: int = 64

    def kept_tokens(self, context_length: int) -> int:
        return self.n_sink + self.window


@adapter(SinkWindow)
class SinkWindowAdapter(StreamingAdapter):
    """Streaming's free range, plan and attention; the window is the budget."""

    fixed = {}
