"""With nothing compressed, kvlab reproduces transformers' logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import ARCHS, random_prompts

from kvlab.generation import decode, prefill
from kvlab.methods import make_method
from kvlab.models.reference import transformers_greedy


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size,chunk", [(4, 32), (16, 2048)])
def test_full_matches_transformers_batch2_left_padding(tiny_models, arch, block_size, chunk):
    model, _ = tiny_models[arch]
    ids = random_prompts((100, 77), seed=1)
    ref_tokens, ref_logits = transformers_greedy(model, ids, new_tokens=12)
    snap = prefill(model, ids, block_size=block_size, chunk_size=chunk, reserve_tokens=4, observe=8)
    out = decode(model, snap, make_method("full"), max_new_tokens=12, return_logits=True)
    assert (out.logits - ref_logits).abs().max().item() <= 1e-4
    assert torch.equal(out.tokens, ref_tokens)


def test_snapshot_is_reusable(tiny_models):
    """Decoding twice from one snapshot gives the same result: decode never mutates the snapshot."""
    model, _ = tiny_models["tiny-qwen2"]
    snap = prefill(model, random_prompts((40, 33)), block_size=8)
    before = snap.store.lengths().clone()
    a = decode(model, snap, make_method("streaming", budget=0.5), max_new_tokens=5)
    b = decode(model, snap, make_method("full"), max_new_tokens=5)
    c = decode(model, snap, make_method("full"), max_new_tokens=5)
    assert torch.equal(snap.store.lengths(), before)
    assert torch.equal(b.tokens, c.tokens)
    assert a.kept_after_prefill.sum() < b.kept_after_prefill.sum()


def test_gemma_sliding_layers_keep_their_window(tiny_models):
    model, _ = tiny_models["tiny-gemma3"]
    snap = prefill(model, random_prompts((150,)), block_size=4)
    window = model.config.sliding_window
    for i, layer in enumerate(snap.store.layers):
        if model.config.layer_types[i] == "sliding_attention":
            assert layer.sliding_window == window
            assert int(layer.lengths.max()) <= window + 64  # trimmed, with bounded slack
        else:
            assert int(layer.lengths.max()) == 150
    assert snap.store.compressible_layers() == [i for i, t in enumerate(model.config.layer_types)
                                                if t == "full_attention"]
