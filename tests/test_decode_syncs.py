"""A decode step reads nothing back from the device (issue 13): plan on the host, run on the device.

The calls that force a device sync on a GPU (``bool``/``int``/``item``/``tolist`` of a tensor,
``nonzero``, ``unique``, boolean-mask indexing, ...) are counted with a ``TorchFunctionMode`` on the
CPU, on random-weight models of 2 and 6 layers: per decode step the count must not grow with the
number of layers and must stay at most 2 (the end-of-sequence flags are read back every few steps).
And one decode step's attention compiles with ``torch.compile(fullgraph=True)``: no graph break.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvlab.experiments.bench_decode import SyncCounter
from kvlab.generation import decode, prefill
from kvlab.methods import make_method
from kvlab.methods.base import StepPlan

STEPS = 40  # past one in-place compaction of the decode-time evictions (every 32 steps by default)
METHODS = [("full", {}), ("block-route", {"budget": 0.25, "dense_layers": 0}), ("kv-compress", {"budget": 0.25}),
           ("streaming", {"budget": 0.25}), ("h2o", {"budget": 0.25, "window": 16}), ("tova", {"budget": 0.25}),
           ("cluster-route", {"budget": 0.25, "dense_layers": 0})]


def random_llama(layers: int):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(layers)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def snapshots():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (300, 217)]  # batch 2, ragged
    out = {}
    for layers in (2, 6):
        model = random_llama(layers)
        out[layers] = model, prefill(model, ids, block_size=16, reserve_tokens=STEPS + 8)  # no growth in decode
    return out


def syncs_per_step(model, snapshot, name, params, steps=STEPS, eos=255):
    """Sync-forcing calls per decode step: counted from the first step's end to the last step's end (the
    method's prefill work and the decode's one-time setup are not steps), with an end-of-sequence id, so
    the flags' read-back is counted too."""
    marks = []
    with SyncCounter() as counter:
        decode(model, snapshot, make_method(name, **params), max_new_tokens=steps + 1, eos_token_id=eos,
               on_step=lambda info: marks.append(dict(counter.counts)))
    assert len(marks) == steps, "the decode ended early"
    calls = {k: marks[-1].get(k, 0) - marks[0].get(k, 0) for k in marks[-1]}
    return sum(calls.values()) / (steps - 1), {k: v for k, v in calls.items() if v}


@pytest.mark.parametrize("name,params", METHODS, ids=[m for m, _ in METHODS])
def test_decode_step_syncs_do_not_grow_with_layers(snapshots, name, params):
    per_step = {}
    for layers, (model, snap) in snapshots.items():
        per_step[layers], calls = syncs_per_step(model, snap, name, params)
        assert per_step[layers] <= 2, f"{name}, {layers} layers: {per_step[layers]:.2f} per step {calls}"
    assert per_step[6] <= per_step[2], f"{name}: {per_step} grows with the layers"


def test_the_counter_sees_what_it_must():
    x = torch.arange(6)
    with SyncCounter() as counter:
        bool(x[0] > 1), int(x[1]), x.tolist(), x[x > 2], x.nonzero(), x.repeat_interleave(x)
        x.repeat_interleave(2), x[torch.tensor([0, 2])], x + 1  # none of these syncs
    assert counter.counts == {"__bool__": 1, "__int__": 1, "tolist": 1, "__getitem__[bool mask]": 1, "nonzero": 1,
                              "repeat_interleave": 1}


# ------------------------------------------------------------------ one step's attention compiles
def _layer_and_query(method_name):
    from kvlab.cache.store import KVStore

    g = torch.Generator().manual_seed(1)
    store = KVStore.empty(2, 2, 2, 16, block_size=16)
    layer = store.layers[1]
    t = 300
    layer.append(torch.randn(2, 2, t, 16, generator=g), torch.randn(2, 2, t, 16, generator=g),
                 torch.arange(t)[None].expand(2, t))
    query = torch.randn(2, 6, 1, 16, generator=g)
    method = make_method(method_name, **({} if method_name == "full" else {"budget": 0.25, "dense_layers": 0}))
    plan = method.plan_step(store, StepPlan(0))  # the host plan of the step (before it, outside what is compiled)
    k = torch.randn(2, 2, 1, 16, generator=g)
    layer.append_decode(k, k, torch.full((2, 1), t))
    return store, layer, query, method, plan


@pytest.mark.parametrize("method_name", ["full", "block-route"])
def test_one_decode_step_of_attention_compiles_without_graph_breaks(method_name):
    """The per-layer run of a decode step -- the method's selection and the attention -- is one graph."""
    from kvlab.attention import attend

    store, layer, query, method, plan = _layer_and_query(method_name)
    positions = torch.full((2, 1), 300)

    def step(q: torch.Tensor) -> torch.Tensor:
        read = method.decode_plan(1, layer, q, plan)
        return attend(layer, q, positions, 0.25, read, backend=plan.backend)

    eager = step(query)
    torch._dynamo.reset()
    # fullgraph: a graph break is an error. aot_eager traces and functionalises the step as inductor does,
    # without inductor's C++ build (which also compiles it, in about a minute on a 2-core machine)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(query)
    assert torch.allclose(out, eager, atol=1e-5)


# ------------------------------------------------------------------ one shape per decode
@pytest.mark.parametrize("name,params", METHODS, ids=[m for m, _ in METHODS])
def test_a_decode_has_few_step_shapes(snapshots, name, params):
    """A CUDA graph is captured per step key (shapes and modes): a decode of 40 steps goes through at most
    two (a first key, and the one after decode-time eviction has left dead slots), and block-route reads
    with the same widths at every step."""
    model, snap = snapshots[6]
    shapes = set()

    def plans(info):
        shapes.add(tuple(None if p is None else tuple(p.index.shape) for p in info.plans.values()))

    result = decode(model, snap, make_method(name, **params), max_new_tokens=STEPS + 1, on_step=plans)
    assert result.step_keys <= 2 and len(shapes) == 1, (result.step_keys, shapes)


# ------------------------------------------------------------------ the CUDA-graph bookkeeping, emulated on the CPU
class ReplayWithoutHost:
    """Stands in for CUDA graphs on the CPU: a capture runs the step once (its host and its device work,
    which a real capture and its first replay do between them); a later replay runs the step again and
    then puts every piece of host state back as it was -- the store's host copies, the method's Python
    state, the cache's -- so that, as in a real replay, only the device work happened."""

    def __init__(self, store_of, method):
        self.store_of, self.method = store_of, method
        self.fresh = set()

    def warm(self, step):
        step()

    def capture(self, step):
        self.fresh.add(step)
        step()
        return step

    def replay(self, step):
        if step in self.fresh:  # the replay right after the capture: the capture already ran it
            self.fresh.discard(step)
            return
        store = self.store_of()
        host = [(list(layer.lengths_host), layer.holes) for layer in store.layers]
        state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self.method).items()}
        step()
        for layer, (lengths, holes) in zip(store.layers, host, strict=True):
            layer.lengths_host, layer.holes = lengths, holes
        vars(self.method).update(state)


@pytest.mark.parametrize("name,params", METHODS + [("block-route", {"budget": 0.25, "dense_layers": 0, "refresh": 3}),
                                                   ("streaming", {"budget": 0.25, "compact_every": 5})],
                         ids=[m for m, _ in METHODS] + ["block-route-refresh", "streaming-compact-5"])
def test_replayed_steps_need_no_host_work(snapshots, monkeypatch, name, params):
    """decode's CUDA-graph driver, with replays that do only device work (emulated): the same tokens and
    logits as eager decode, and the store's host copies still equal its device tensors. A method whose
    step relied on Python state changing from step to step would fail here."""
    import kvlab.generation as generation

    model, snap = snapshots[2]
    ref = decode(model, snap, make_method(name, **params), max_new_tokens=STEPS, return_logits=True)
    method = make_method(name, **params)
    seen = {}

    def graphs(device, m, store, triton, cuda_graphs, on_step, forced_chunk):
        seen["store"] = store
        return generation._StepGraphs(ReplayWithoutHost(lambda: store, m))

    monkeypatch.setattr(generation, "_step_graphs", graphs)
    out = decode(model, snap, method, max_new_tokens=STEPS, return_logits=True)
    assert out.replays >= STEPS - 6, out.replays
    assert torch.equal(out.tokens, ref.tokens) and (out.logits - ref.logits).abs().max() <= 1e-5
    for layer in seen["store"].layers:
        assert layer.lengths_host == layer.lengths.tolist()
