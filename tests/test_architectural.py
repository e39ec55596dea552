"""Architectural strategies applied post hoc: local-global and cross-layer; native Gemma 3 local/global."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.errors import KVLabError
from kvlab.generation import decode, prefill
from kvlab.methods import make_method
from kvlab.methods.cross_layer import SharedLayerStore

PROMPT = [[(3 * i) % 250 + 1 for i in range(80)]]


@pytest.fixture(scope="module")
def tiny():
    model, _ = kvlab.load("random:tiny-llama")
    return model, prefill(model, PROMPT, reserve_tokens=16)


@pytest.fixture(scope="module")
def gemma():
    model, _ = kvlab.load("random:tiny-gemma3")  # 3 sliding layers (window 8) + 1 global layer
    return model, prefill(model, PROMPT, reserve_tokens=16)


def test_gemma3_full_reproduces_native_local_global(gemma) -> None:
    model, snap = gemma
    res = decode(model, snap, make_method("full"), 6, return_logits=True)
    seq = torch.tensor([PROMPT[0] + res.tokens[0, :-1].tolist()])
    with torch.inference_mode():
        native = model(input_ids=seq).logits[0, len(PROMPT[0]) - 1:].float()  # transformers' own sliding masks
    assert torch.allclose(res.logits[0], native, atol=1e-4)
    # the sliding layers hold their window (plus trimming slack), the global one everything
    kept = res.kept_at_end[:, 0, 0].tolist()
    assert kept[3] == 80 + 5 and all(k < 80 for k in kept[:3])


def test_local_global_native_pattern_changes_nothing_on_gemma3(gemma) -> None:
    model, snap = gemma
    full = decode(model, snap, make_method("full"), 5, return_logits=True)
    res = decode(model, snap, make_method("local-global", locals_per_global=5, window=4), 5, return_logits=True)
    assert torch.equal(res.logits, full.logits)  # a natively local/global model keeps its own pattern


def test_local_global_post_hoc(tiny) -> None:
    model, snap = tiny
    full = decode(model, snap, make_method("full"), 5, return_logits=True)
    wide = decode(model, snap, make_method("local-global", locals_per_global=1, window=4096), 5, return_logits=True)
    assert torch.equal(wide.logits, full.logits)  # a window wider than the context is full attention
    lg = make_method("local-global", locals_per_global=1, window=16)
    assert lg.local_layers(4) == [0, 2]
    res = decode(model, snap, lg, 5, return_logits=True)
    assert res.kept_after_prefill[0].flatten().tolist() == [16, 16]  # layer 0 local, 1 global
    assert res.kept_after_prefill[1].flatten().tolist() == [80, 80]
    assert int(res.kept_at_end[0].max()) <= 16 + 64  # the store's sliding-window trim keeps it bounded
    assert res.bytes_after_prefill < full.bytes_after_prefill
    assert not torch.equal(res.logits, full.logits)


def test_local_global_bad_input() -> None:
    with pytest.raises(KVLabError, match="locals_per_global"):
        make_method("local-global", locals_per_global=0)
    with pytest.raises(KVLabError, match="window"):
        make_method("local-global", window=0)


def test_cross_layer(tiny) -> None:
    model, snap = tiny
    full = decode(model, snap, make_method("full"), 5, return_logits=True)
    none = decode(model, snap, make_method("cross-layer", fraction=0.0), 5, return_logits=True)
    assert torch.equal(none.logits, full.logits)
    method = make_method("cross-layer", fraction=0.5)
    store = snap.store.clone()
    assert method.sharing(store) == {1: 0}
    res = decode(model, snap, method, 5, return_logits=True)
    assert res.bytes_after_prefill * 2 == full.bytes_after_prefill  # layer 1 caches nothing
    assert torch.equal(res.kept_at_end[1], res.kept_at_end[0])  # it reads layer 0's tokens
    assert torch.isfinite(res.logits).all() and not torch.equal(res.logits, full.logits)


def test_cross_layer_reads_the_layer_below(tiny) -> None:
    model, snap = tiny
    store = snap.store.clone()
    from kvlab.methods.base import PrefillContext

    make_method("cross-layer", layers="1").prefill_end(store, PrefillContext(snap.context_lengths, {}, 1.0, 4))
    shared = store.layers[1]
    assert isinstance(shared, SharedLayerStore) and shared.kv_bytes_allocated() == 0
    k0, v0, _ = store.layers[0].dense_view()
    k1, v1, _ = shared.dense_view()
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    n = int(store.layers[0].lengths[0])
    shared.append(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), torch.tensor([[80]]))
    assert int(store.layers[0].lengths[0]) == n  # its own K/V are dropped


def test_cross_layer_bad_input(tiny) -> None:
    model, snap = tiny
    with pytest.raises(KVLabError, match="cannot share"):
        decode(model, snap, make_method("cross-layer", layers="0"), 2)
    with pytest.raises(KVLabError, match="fraction"):
        make_method("cross-layer", fraction=1.0)
