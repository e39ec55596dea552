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
    """Run decode and return the store it ended with (decode works on a copy)."""
    from kvlab.generation import KVLabCache  # noqa: F401  (the store is internal; rebuild it here)

    store = snap.store.clone()
    from kvlab.methods.base import PrefillContext

    method.prefill_end(store, PrefillContext(snap.context_lengths, snap.queries, snap.scaling, snap.num_query_heads))
    _assert_sinks_plus_window(store, 4, 20, [95, 63])
    import torch

    from kvlab.methods.base import StepContext
    from kvlab.models.integration import running

    cache = KVLabCache(store, method=method)
    cache.decoding = True
    token = snap.logits.argmax(-1)
    with torch.inference_mode(), running(model, cache):
        for step in range(steps - 1):
            pos = (snap.context_lengths + step)[:, None]
            cache.set_inputs(pos, torch.ones_like(pos, dtype=torch.bool))
            logits = model(input_ids=token[:, None], position_ids=pos, past_key_values=cache).logits[:, -1]
            method.step_end(store, StepContext(step=step, positions=pos[:, 0]))
            token = logits.argmax(-1)
    return store


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
