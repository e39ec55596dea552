"""kvlab's evictions keep exactly the tokens kvpress 0.5.5 keeps, on the same tiny random Llama (GQA).

kvpress runs its press on the Hugging Face model during prefill; the token indices it kept are found
by matching its pruned keys against the keys of an uncompressed run. kvlab prefills once on its own
store, applies the method, and reads the original positions of what each (layer, head) kept.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvlab
from kvlab.generation import prefill
from kvlab.methods.base import PrefillContext

kvpress = pytest.importorskip("kvpress")  # installed by `make test` (the [kvpress] extra)

T = 601  # not a multiple of 8: T * (1 - ratio) is fractional at every ratio, so rounding is checked too
RATIOS = [0.25, 0.5, 0.875]


@pytest.fixture(scope="module")
def setup():
    model, _ = kvlab.load("random:tiny-llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        full = DynamicCache()
        model(ids, past_key_values=full)
    full_keys = [layer.keys.clone() for layer in full.layers]
    snapshot = prefill(model, ids.tolist(), observe=64)
    return model, ids, full_keys, snapshot


def kvpress_kept(model, ids, full_keys, press) -> list[list[list[list[int]]]]:
    """[layer][b][h] -> sorted kept token indices, recovered by matching kept keys with the full keys."""
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    out = []
    for layer, keys in zip(cache.layers, full_keys, strict=True):
        per_b = []
        for b in range(keys.shape[0]):
            per_h = []
            for h in range(keys.shape[1]):
                match = (layer.keys[b, h][:, None, :] == keys[b, h][None, :, :]).all(-1)  # [n_kept, T]
                assert bool((match.sum(1) == 1).all()), "a kept key does not match exactly one original key"
                per_h.append(sorted(match.float().argmax(1).tolist()))
            per_b.append(per_h)
        out.append(per_b)
    return out


def kvlab_kept(snapshot, method) -> list[list[list[list[int]]]]:
    store = snapshot.store.clone()
    ctx = PrefillContext(context_lengths=snapshot.context_lengths.clone(), queries=snapshot.queries,
                         scaling=snapshot.scaling, num_query_heads=snapshot.num_query_heads)
    method.prefill_end(store, ctx)
    out = []
    for layer in store.layers:
        out.append([[sorted(layer.row_view(b * layer.kv_heads + h)[2].tolist()) for h in range(layer.kv_heads)]
                    for b in range(layer.batch)])
    return out


PAIRS = [
    ("snapkv", lambda r: kvpress.SnapKVPress(compression_ratio=r)),
    ("streaming", lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
    ("knorm", lambda r: kvpress.KnormPress(compression_ratio=r)),
    ("tova", lambda r: kvpress.TOVAPress(compression_ratio=r)),
    ("pyramidkv", lambda r: kvpress.PyramidKVPress(compression_ratio=r)),
]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name,make_press", PAIRS, ids=[p[0] for p in PAIRS])
def test_same_tokens_as_kvpress(setup, name, make_press, ratio):
    model, ids, full_keys, snapshot = setup
    expected = kvpress_kept(model, ids, full_keys, make_press(ratio))
    got = kvlab_kept(snapshot, kvlab.make_method(name, ratio=ratio))
    n_kept = int(T * (1 - ratio))
    if name != "pyramidkv":
        assert all(len(h) == n_kept for layer in got for b in layer for h in b)
    assert got == expected


@pytest.mark.parametrize("ratio", RATIOS[:2])
def test_ada_snapkv_keeps_the_complement_of_adakv_mask(setup, ratio):
    """AdaKVPress only masks; kvlab's ada-snapkv evicts the same entries for real (different head lengths)."""
    model, ids, full_keys, snapshot = setup
    press = kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache())
    got = kvlab_kept(snapshot, kvlab.make_method("ada-snapkv", ratio=ratio))
    lengths = set()
    for i, decoder in enumerate(model.model.layers):
        b_idx, h_idx, t_idx = decoder.self_attn.masked_key_indices
        masked = torch.zeros(ids.shape[0], full_keys[i].shape[1], T, dtype=torch.bool)
        masked[b_idx, h_idx, t_idx] = True
        decoder.self_attn.masked_key_indices = None
        for b in range(ids.shape[0]):
            for h in range(full_keys[i].shape[1]):
                assert got[i][b][h] == torch.nonzero(~masked[b, h]).flatten().tolist()
                lengths.add(len(got[i][b][h]))
    assert len(lengths) > 1  # heads really have different lengths


def test_snapkv_budget_below_window_is_an_error_not_an_arbitrary_subset(setup):
    """Deliberate difference: kvpress keeps an arbitrary part of the window when n_kept < window; kvlab refuses."""
    _, _, _, snapshot = setup
    with pytest.raises(kvlab.KVLabError, match="observation window"):
        kvlab_kept(snapshot, kvlab.make_method("snapkv", ratio=0.95))
