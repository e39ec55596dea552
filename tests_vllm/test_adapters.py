"""The adapter seam (kvlab.vllm.methods): adapters found by the kvlab method's class, one-line refusals naming
what runs, and a throw-away method registered from one file (sink_window.py) served by a real tiny engine."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.methods import METHODS, make_method
from kvlab.methods.ada_snapkv import AdaSnapKV
from kvlab.methods.h2o import H2O
from kvlab.methods.kv_compress import KVCompress, KVCompressW32
from kvlab.methods.scorer import ScorerMethod
from kvlab.methods.streaming import Streaming
from kvlab.methods.tova import TOVA
from kvlab.vllm import config as kvconfig
from kvlab.vllm.eviction import Rows, WorkerState
from kvlab.vllm.methods import (
    ADAPTERS,
    ADAPTERS_ENV,
    EVICTS,
    INERT,
    ROUTES,
    Adapter,
    adapter,
    adapter_class,
    adapter_for,
    runnable,
)
from kvlab.vllm.methods.block_route import BlockRouteAdapter
from kvlab.vllm.methods.full import FullAdapter
from kvlab.vllm.methods.held import HeldScorerAdapter
from kvlab.vllm.methods.kv_compress import KVCompressAdapter, PrefillEviction
from kvlab.vllm.methods.scorers import ScorerAdapter
from kvlab.vllm.methods.streaming import StreamingAdapter


@pytest.fixture(scope="module")
def sink_window():
    """``sink_window.py`` imported (its method and adapter registered), and both unregistered afterwards."""
    module = importlib.import_module("sink_window")
    try:
        yield module
    finally:
        METHODS.pop(module.SinkWindow.name, None)
        ADAPTERS.pop(module.SinkWindow, None)
        sys.modules.pop("sink_window", None)


# ---------------------------------------------------------------- the registry
def test_adapters_are_found_by_the_methods_class():
    assert adapter_class(METHODS["full"]) is FullAdapter and FullAdapter.role == INERT
    assert adapter_class(METHODS["block-route"]) is BlockRouteAdapter and BlockRouteAdapter.role == ROUTES
    assert adapter_class(Streaming) is StreamingAdapter and StreamingAdapter.role == EVICTS
    assert adapter_class(KVCompress) is KVCompressAdapter and KVCompressAdapter.role == EVICTS
    assert adapter_class(KVCompressW32) is KVCompressAdapter  # a subclass is served by its base's adapter
    assert adapter_class(type("Sinks", (Streaming,), {})) is StreamingAdapter
    assert adapter_class(ScorerMethod) is ScorerAdapter and adapter_class(AdaSnapKV) is ScorerAdapter  # every scorer
    assert adapter_class(H2O) is HeldScorerAdapter and adapter_class(TOVA) is HeldScorerAdapter  # decode-time
    held = kvconfig.parse({"method": "h2o", "budget": 0.25}, 32).adapter
    assert type(held) is HeldScorerAdapter and held.method.decode_evict and held.pages(1000) == 8  # 250 tokens
    tokens = kvconfig.parse({"method": "tova", "budget_tokens": 512}, 128).adapter
    assert tokens.cap(2000) == tokens.cap(300) == 512 and tokens.pages(300) == 4  # a short prompt grows to 512
    once = kvconfig.parse({"method": "tova", "budget": 0.25, "decode_evict": False}, 32).adapter
    assert type(once) is ScorerAdapter and once.method.page == 32  # once, at the prompt's end, whole pages
    with pytest.raises(KVLabError, match="page keeps whole pages once.*decode_evict=false"):
        kvconfig.parse({"method": "h2o", "budget": 0.25, "page": 32}, 32)
    made = adapter_for(make_method("kv-compress-w32", budget=0.25), 32)
    assert isinstance(made, KVCompressAdapter) and made.observed() == 32
    # ScorerAdapter refuses AdaKV: per-head budgets
    with pytest.raises(KVLabError, match="ada-snapkv' cannot run inside vLLM yet .its per-head budgets need per-head"):
        kvconfig.parse({"method": "ada-snapkv", "budget": 0.25}, 32)
    with pytest.raises(KVLabError, match="cannot run inside vLLM yet"):
        adapter_for(make_method("cluster-route", budget=0.25), 32)


def test_the_nearest_adapter_in_the_mro_wins_and_a_class_has_one():
    sub = type("Sinks", (Streaming,), {})
    own = adapter(sub)(type("SinksAdapter", (StreamingAdapter,), {}))
    try:
        assert adapter_class(sub) is own and own.serves is sub
        assert adapter_class(type("Deeper", (sub,), {})) is own
        assert adapter_class(Streaming) is StreamingAdapter
        with pytest.raises(AssertionError, match="already has the adapter"):
            adapter(sub)(type("Again", (Adapter,), {}))
    finally:
        ADAPTERS.pop(sub)


@pytest.mark.parametrize("name, words", [
    ("nope", ["unknown method 'nope'; vLLM runs: "]),
    ("oracle-tokens", ["method 'oracle-tokens' cannot run inside vLLM yet (", "block table per request"]),
    ("cluster-route", ["cannot run inside vLLM yet (", "block table per request"]),
    ("low-rank", ["cannot run inside vLLM yet (", "full-width keys and values"]),
])
def test_an_unknown_or_unsupported_method_is_refused_in_one_line_naming_what_runs(name, words):
    with pytest.raises(KVLabError) as err:
        kvconfig.parse({"method": name, "budget": 0.25}, 128)
    message = str(err.value)
    assert "\n" not in message and message.endswith(f"vLLM runs: {', '.join(runnable())}")
    assert all(w in message for w in words), message
    assert runnable()[:4] == ["full", "block-route", "streaming", "kv-compress"]
    assert runnable(EVICTS) == ["streaming", "kv-compress", "kv-compress-w32", "snapkv", "pyramidkv", "h2o", "tova",
                                "knorm", "random"]


def test_what_each_adapter_asks_of_the_engine():
    layer = kvconfig.parse({"method": "kv-compress", "budget": 0.25, "rates": "layer"}, 32)
    uniform = kvconfig.parse({"method": "kv-compress-w32", "budget": 0.25}, 32)
    assert layer.evicts and layer.adapter.group_per_layer() == "rates=layer"
    assert uniform.adapter.group_per_layer() is None and uniform.adapter.observed() == 32
    assert "first KV blocks" in layer.adapter.prefix_cache_off()
    streaming = kvconfig.parse({"method": "streaming", "budget": 0.25}, 32).adapter
    assert streaming.prefix_cache_off() is None and streaming.free_range(1000, 999, None) == (0, 0)
    routed = kvconfig.parse({"method": "block-route", "budget": 0.125}, 128)
    assert routed.active and not routed.evicts and routed.adapter.routes_layer(2, 4)
    assert not routed.adapter.routes_layer(1, 4)  # dense_layers=2
    full = kvconfig.parse({"method": "full"}, 128)
    assert not full.active and full.adapter.step_plan(torch.zeros(1, 1), torch.ones(1), 1, 2) is None


def test_an_adapter_option_is_validated_and_carried_in_the_kvlab_entry():
    """block-route's ``per_head`` is the adapter's, not the method's: checked, in the startup line, and in the
    entry the workers parse again; per KV head unless given, or where the backend reads one page list per
    request (CUDA), where asking for it is refused."""
    plain = kvconfig.parse({"method": "block-route", "budget": 0.125}, 128)
    assert plain.adapter.head_groups(2) == 2 and plain.describe()["per_head"] is True
    assert plain.method.score == "centroid" and "per_head" not in plain.additional_config()["kvlab"]
    request = kvconfig.parse({"method": "block-route", "budget": 0.125, "per_head": False}, 128)
    assert request.adapter.head_groups(2) == 1 and request.describe()["per_head"] is False
    again = kvconfig.parse(request.additional_config()["kvlab"], 128)
    assert again.adapter.option == {"per_head": False} and again.method == request.method
    cuda = kvconfig.parse({"method": "block-route", "budget": 0.125}, 128, heads_apart=False)
    assert cuda.adapter.head_groups(2) == 1 and cuda.method == plain.method
    with pytest.raises(KVLabError, match="per_head=true runs on vLLM's CPU backend"):
        kvconfig.parse({"method": "block-route", "budget": 0.125, "per_head": True}, 128, heads_apart=False)
    with pytest.raises(KVLabError, match="per_head takes a bool, got 'yes'"):
        kvconfig.parse({"method": "block-route", "budget": 0.125, "per_head": "yes"}, 128)
    with pytest.raises(KVLabError, match="has no parameter per_head"):
        kvconfig.parse({"method": "streaming", "budget": 0.25, "per_head": True}, 128)


def test_the_prefill_end_plan_with_and_without_observed_queries():
    """Rows of prompt 100 (32-token pages): a chunk that stops at 96, one that ends the prompt, and a decode."""
    method = make_method("kv-compress", budget=0.25)
    rows = Rows.of(["a", "b", "c"], torch.tensor([100, 100, 100]), torch.tensor([96, 100, 101]),
                   torch.tensor([0, 96, 146, 147]))
    table = torch.arange(12, dtype=torch.int32).view(3, 4)

    class NoQueries(PrefillEviction):  # a method that scores keys only (a key-norm press, say)
        def observed(self) -> int:
            return 0

        def pages(self, n: int) -> int | None:
            return 1

    for made, stash, compress in ((KVCompressAdapter(method, 32), [("a", 92, 4)], ["b"]),
                                  (NoQueries(method, 32), [], ["b"])):
        step, _, _ = made.plan(WorkerState(made, runner=None), rows, table, torch.tensor([96, 100, 101]), 0)
        assert step.stash == stash and [r.req_id for r in step.compress] == compress


# ---------------------------------------------------------------- a method registered from one file, served
def test_a_method_registered_from_one_file_is_what_runs(sink_window):
    assert adapter_class(sink_window.SinkWindow) is sink_window.SinkWindowAdapter
    assert "test-sink-window" in runnable(EVICTS)
    cfg = kvconfig.parse({"method": "test-sink-window", "window": 64}, 32)
    assert cfg.log_line() == "kvlab: method test-sink-window (page_size=32 n_sink=4 window=64)"


@contextlib.contextmanager
def in_every_process(module: str):
    """vLLM spawns its engine core and worker (on the CPU it always spawns): they import ``module``, from this
    directory, through ``KVLAB_VLLM_ADAPTERS``."""
    here = str(Path(__file__).parent)
    saved = {k: os.environ.get(k) for k in (ADAPTERS_ENV, "PYTHONPATH")}
    os.environ[ADAPTERS_ENV] = module
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_the_throwaway_method_runs_in_a_real_engine_as_streaming(sink_window, tiny_model):
    """Served by streaming's adapter: kvlab's own streaming tokens at the same sinks and window, and the gap
    between them back in vLLM's pool at the first decode step."""
    from test_eviction_engine import EVICT_LENGTHS, MEMORY_PROMPT, PAGE, kvlab_reference, run
    from transformers import AutoModelForCausalLM

    with in_every_process("sink_window"):
        out = run(tiny_model, {"method": "test-sink-window", "n_sink": 4, "window": 64})
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    tokens, _ = kvlab_reference(model, "streaming", n_sink=4, window=64)
    assert len(out["tokens"]) == len(EVICT_LENGTHS) and out["tokens"] == tokens
    usage = out["usage"]
    assert max(usage[:2]) == -(-MEMORY_PROMPT // PAGE)
    assert max(usage[2:]) <= 1 + -(-(64 + 40) // PAGE) + 1  # sink page + window + the newest page
