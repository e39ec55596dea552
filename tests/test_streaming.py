"""StreamingLLM keeps exactly the sink tokens plus the recent window, at every layer and head."""

from __future__ import annotations

import pytest
from tests.conftest import random_prompts

from kvlab.errors import KVLabError
from kvlab.generation import decode, prefill
from kvlab.methods import make_method


def _assert_sinks_plus_window(store, n_sink, window, newest):
    for i in store.compressible_layers():
        layer = store.layers[i]
        for row in range(layer.rows):
            b = row // layer.kv_heads
            _, _, pos = layer.row_view(row)
            expected = list(range(n_sink)) + list(range(newest[b] - window + 1, newest[b] + 1))
            assert pos.tolist() == expected, (i, row)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_streaming_keeps_sinks_and_window(tiny_models, arch):
    model, _ = tiny_models[arch]
    snap = prefill(model, random_prompts((96, 64)), block_size=8)
    method = make_method("streaming", n_sink=4, window=20)
    out = decode(model, snap, method, max_new_tokens=6)
    assert out.kept_after_prefill[snap.store.compressible_layers()].unique().tolist() == [24]
    # After 5 decode steps the newest token of sequence b sits at position len_b + 4.
    store_after = _decode_store(model, snap, method, 6)
    _assert_sinks_plus_window(store_after, 4, 20, [96 + 4, 64 + 4])


def _decode_store(model, snap, method, steps):
    """Run decode and return the store it ended with (decode works on a copy; a step callback sees it)."""
    from kvlab.methods.base import PrefillContext

    store = snap.store.clone()
    method.prefill_end(store, PrefillContext(snap.context_lengths, snap.queries, snap.scaling, snap.num_query_heads))
    _assert_sinks_plus_window(store, 4, 20, [95, 63])
    seen = {}
    decode(model, snap, method, max_new_tokens=steps, on_step=lambda info: seen.setdefault("store", info.store))
    return seen["store"]


@pytest.mark.parametrize("compact_every", [1, 3, 32])
def test_decode_eviction_marks_then_compacts(tiny_models, compact_every):
    """Each step marks the token that left the window dead; compaction every k steps (and at the end) gives
    the same cache and the same logits as evicting at every step."""
    import torch

    model, _ = tiny_models["tiny-qwen2"]
    snap = prefill(model, random_prompts((96, 64)), block_size=8)
    ref = decode(model, snap, make_method("streaming", n_sink=4, window=20, compact_every=1), max_new_tokens=12,
                 return_logits=True)
    method = make_method("streaming", n_sink=4, window=20, compact_every=compact_every)
    lengths = []
    out = decode(model, snap, method, max_new_tokens=12, return_logits=True,
                 on_step=lambda info: lengths.append(info.store.layers[0].lengths_host[0]))
    assert (out.logits - ref.logits).abs().max() <= 1e-5 and torch.equal(out.tokens, ref.tokens)
    assert max(lengths) <= 24 + compact_every + 1  # the memory bound: kept + compact_every + the new token
    _assert_sinks_plus_window(_decode_store(model, snap, method, 12), 4, 20, [96 + 10, 64 + 10])


def test_streaming_budget_sets_the_window(tiny_models):
    model, _ = tiny_models["tiny-llama"]
    snap = prefill(model, random_prompts((100,)), block_size=4)
    out = decode(model, snap, make_method("streaming", budget=0.25, n_sink=4), max_new_tokens=3)
    assert out.kept_after_prefill.unique().tolist() == [25]
    out = decode(model, snap, make_method("streaming", ratio=0.75, n_sink=4), max_new_tokens=3)
    assert out.kept_after_prefill.unique().tolist() == [25]


def test_streaming_full_budget_is_full(tiny_models):
    import torch

    model, _ = tiny_models["tiny-qwen2"]
    snap = prefill(model, random_prompts((50, 31)), block_size=4)
    a = decode(model, snap, make_method("streaming", budget=1.0), max_new_tokens=8, return_logits=True)
    b = decode(model, snap, make_method("full"), max_new_tokens=8, return_logits=True)
    assert (a.logits - b.logits).abs().max() <= 1e-4
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.kept_after_prefill, b.kept_after_prefill) and torch.equal(a.kept_at_end, b.kept_at_end)


def test_streaming_bad_parameters():
    with pytest.raises(KVLabError, match="n_sink"):
        make_method("streaming", n_sink=-1)
    with pytest.raises(KVLabError, match="window"):
        make_method("streaming", window=-3)
    with pytest.raises(KVLabError, match="budget"):
        make_method("streaming", budget=0)
