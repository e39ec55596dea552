"""kv-compress with the kept lengths a paged engine can free (rates="uniform"/"layer", what kvlab.vllm runs)."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.errors import KVLabError
from kvlab.generation import decode, prefill
from kvlab.methods._paged import kept_full_pages
from kvlab.methods.base import PrefillContext
from kvlab.methods.kv_compress import pages_per_layer

BS = 16


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["tiny-llama"][0]


@pytest.fixture(scope="module")
def snapshot(model):
    torch.manual_seed(0)
    ids = [torch.randint(0, 256, (300,)).tolist(), torch.randint(0, 256, (237,)).tolist()]
    return prefill(model, ids, block_size=BS, observe=64)


def compress(snapshot, method):
    store = snapshot.store.clone()
    ctx = PrefillContext(context_lengths=snapshot.context_lengths.clone(), queries=snapshot.queries,
                         scaling=snapshot.scaling, num_query_heads=snapshot.num_query_heads)
    method.prefill_end(store, ctx)
    return store


def test_kept_full_pages():
    # 300 tokens, pages of 16: 18 full pages + 12 in the partial last page
    assert kept_full_pages(300, 75, 16, 8, 0) == (75 - 12) // 16 == 3
    assert kept_full_pages(300, 300, 16, 8, 0) == 18  # everything: no page evicted
    assert kept_full_pages(300, 1, 16, 8, 0) == 0  # the 8 protected tokens all sit in the partial page
    assert kept_full_pages(300, 1, 16, 20, 4) == 1  # 8 protected + 4 sinks in the full pages: one page
    assert kept_full_pages(320, 1, 16, 20, 4) == 2  # no partial page: 20 + 4 tokens need two pages


def test_pages_per_layer_gives_pages_to_the_layer_whose_tokens_matter_more():
    peaked = torch.zeros(2, 64)
    peaked[:, :8] = 10.0  # a few tokens carry everything
    flat = torch.linspace(1, 2, 64).repeat(2, 1)
    counts = pages_per_layer([peaked, flat], uniform=2, floor=0, page=8)
    assert counts == [1, 3] and sum(counts) == 4
    assert pages_per_layer([peaked, flat], uniform=8, floor=0, page=8) == [8, 8]  # every page kept


@pytest.mark.parametrize("rates", ["uniform", "layer"])
def test_paged_rates_keep_whole_pages_each_heads_own_tokens_and_the_partial_page(snapshot, rates):
    store = compress(snapshot, kvlab.make_method("kv-compress", ratio=0.75, rates=rates))
    lengths = store.lengths()  # [L, B, H]
    for b, n in enumerate(snapshot.context_lengths.tolist()):
        tail = n % BS
        uniform = kept_full_pages(n, int(0.25 * n), BS, 8, 0)
        per_layer = (lengths[:, b] - tail) // BS  # [L, H]
        assert bool(((lengths[:, b] - tail) % BS == 0).all())
        assert bool((per_layer == per_layer[:, :1]).all())  # one count per layer for every KV head
        assert int(per_layer[:, 0].sum()) == uniform * store.num_layers  # the uniform total
        if rates == "uniform":
            assert set(per_layer.flatten().tolist()) == {uniform}
        heads = []
        for i in range(store.num_layers):
            for h in range(store.kv_heads):
                pos = store.layers[i].row_view(b * store.kv_heads + h)[2].tolist()
                assert pos == sorted(pos) and pos[-tail:] == list(range(n - tail, n))  # the partial page stays
                heads.append(pos)
        assert len({tuple(p) for p in heads}) > 1  # heads choose their own tokens
    if rates == "layer":
        assert len(set(lengths[:, 1, 0].tolist())) > 1  # the random model's layers get different lengths


def test_paged_rates_at_ratio_zero_are_full(model, snapshot):
    reference = decode(model, snapshot, kvlab.make_method("full"), 4, return_logits=True)
    result = decode(model, snapshot, kvlab.make_method("kv-compress", ratio=0.0, rates="layer"), 4, return_logits=True)
    assert torch.equal(result.kept_at_end, reference.kept_at_end)


@pytest.mark.parametrize("params", [{"rates": "page"}, {"rates": "layer", "interval": 4},
                                    {"rates": "uniform", "max_cache_tokens": 100}])
def test_paged_rates_bad_input(params):
    with pytest.raises(KVLabError):
        kvlab.make_method("kv-compress", ratio=0.5, **params) if "max_cache_tokens" not in params else \
            kvlab.make_method("kv-compress", **params)
