"""With nothing compressed, kvlab reproduces transformers' logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import ARCHS, random_prompts

from kvlab.attention import gqa
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


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_chunked_prefill_without_mask_matches_transformers(tiny_models, arch, monkeypatch):
    """Equal-length prompts prefilled in chunks take the maskless causal-chunk path (flash attention over
    the earlier keys, merged by log-sum-exp with the chunk's own causal attention) and still give
    transformers' logits."""
    import kvlab.attention.torch_attention as ta

    calls = []
    monkeypatch.setattr(ta, "attend_causal_chunk", lambda *a: calls.append(1) or gqa.attend_causal_chunk(*a))
    model, _ = tiny_models[arch]
    ids = random_prompts((192, 192), seed=2)  # the last chunks see >= 4 chunks of earlier keys
    ref_tokens, ref_logits = transformers_greedy(model, ids, new_tokens=6)
    snap = prefill(model, ids, block_size=16, chunk_size=32, reserve_tokens=4, observe=8)
    out = decode(model, snap, make_method("full"), max_new_tokens=6, return_logits=True)
    assert calls, "the causal-chunk path was not taken"
    assert (out.logits - ref_logits).abs().max().item() <= 1e-4
    assert torch.equal(out.tokens, ref_tokens)


def test_causal_chunk_equals_masked_attention():
    torch.manual_seed(0)
    for b, h, g, length, t, d in [(2, 2, 6, 7, 50, 16), (1, 1, 1, 5, 25, 8), (3, 2, 2, 64, 320, 64)]:
        query = torch.randn(b, h * g, length, d)
        k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
        kpos, qpos = torch.arange(t).expand(b, h, t), torch.arange(t - length, t).expand(b, length)
        assert gqa.can_attend_causal_chunk(query, kpos, qpos)
        q = gqa.group_queries(query, h)
        mask = gqa.expand_groups(gqa.visibility(kpos, qpos[:, None, :], None), g)
        assert torch.allclose(gqa.attend_causal_chunk(q, k, v, g, 0.3), gqa.attend_rows(q, k, v, mask, 0.3),
                              atol=1e-5)
        padded = kpos.clone()
        padded[0, 0, 0] = -1
        assert not gqa.can_attend_causal_chunk(query, padded, qpos)
        assert not gqa.can_attend_causal_chunk(query, kpos, qpos - 1)
