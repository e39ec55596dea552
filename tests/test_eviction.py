"""Eviction methods: real memory savings, KV-Compress's schedule, full-budget identity, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvlab
from kvlab.cache.store import KVStore
from kvlab.generation import decode, prefill
from kvlab.methods.base import PrefillContext

EVICTION = ["kv-compress", "kv-compress-w32", "snapkv", "pyramidkv", "ada-snapkv", "h2o", "tova", "knorm", "random"]
BS = 16


@pytest.fixture(scope="module")
def model():
    return kvlab.load("random:tiny-llama")[0]


@pytest.fixture(scope="module")
def snapshot(model):
    torch.manual_seed(0)
    ids = [torch.randint(0, 256, (300,)).tolist(), torch.randint(0, 256, (230,)).tolist()]  # left padding
    return prefill(model, ids, block_size=BS, observe=64)


def compress(snapshot, method) -> KVStore:
    store = snapshot.store.clone()
    ctx = PrefillContext(context_lengths=snapshot.context_lengths.clone(), queries=snapshot.queries,
                         scaling=snapshot.scaling, num_query_heads=snapshot.num_query_heads)
    method.prefill_end(store, ctx)
    return store


def kept_positions(store: KVStore, layer: int, row: int) -> list[int]:
    return store.layers[layer].row_view(row)[2].tolist()


# ------------------------------------------------------------------ full budget
@pytest.fixture(scope="module")
def reference(model, snapshot):
    return decode(model, snapshot, kvlab.make_method("full"), 4, return_logits=True)


@pytest.mark.parametrize("name", EVICTION)
def test_ratio_zero_is_identical_to_full(model, snapshot, reference, name):
    extra = {"interval": 2} if name == "kv-compress" else {}
    result = decode(model, snapshot, kvlab.make_method(name, ratio=0.0, **extra), 4, return_logits=True)
    assert torch.equal(result.kept_at_end, reference.kept_at_end)
    assert (result.logits - reference.logits).abs().max() <= 1e-4


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
@pytest.mark.parametrize("name", EVICTION)
def test_memory_is_really_freed(snapshot, name, ratio):
    params = {"window": 16} if name in ("snapkv", "pyramidkv", "ada-snapkv", "h2o") else {}
    before = snapshot.store.bytes_allocated()
    store = compress(snapshot, kvlab.make_method(name, ratio=ratio, **params))
    layer = store.layers[0]
    slot_bytes = 2 * layer.head_dim * layer.keys.element_size() + layer.positions.element_size()
    partial_blocks = store.num_layers * store.batch * store.kv_heads
    # tensor storage, measured on the tensors themselves (not a counter the method keeps)
    after = sum(t.untyped_storage().nbytes() for lay in store.layers for t in lay.tensors())
    assert after == store.bytes_allocated()
    assert after <= (1 - ratio) * before + partial_blocks * BS * slot_bytes
    kept = store.lengths().sum().item()
    assert kept <= (1 - ratio) * snapshot.store.lengths().sum().item() + (partial_blocks if name == "pyramidkv" else 0)


def test_generate_reports_cache_before_and_after(model):
    from kvlab.models.loader import ByteTokenizer

    tok = ByteTokenizer(model.config.vocab_size)
    result = kvlab.generate(model, tok, "x" * 400, method="kv-compress", ratio=0.875, max_new_tokens=4)
    assert result.stats["cache_mb_after_prefill"] <= 0.2 * result.stats["cache_mb_full"]


# ------------------------------------------------------------------ kv-compress
def test_kv_compress_variable_lengths_whole_blocks_and_budget(snapshot):
    ratio = 0.75
    store = compress(snapshot, kvlab.make_method("kv-compress", ratio=ratio))
    lengths = store.lengths()  # [L, B, H]
    assert len(set(lengths.flatten().tolist())) > 2  # layers and heads differ
    full = snapshot.context_lengths.view(1, -1, 1).expand_as(lengths)
    evicted = full - lengths
    assert bool(((evicted % BS == 0) | (lengths == 8)).all())  # whole blocks (or down to the protected tokens)
    for b, n in enumerate(snapshot.context_lengths.tolist()):
        allowed = int((1 - ratio) * n * store.num_layers * store.kv_heads)
        kept = int(lengths[:, b].sum())
        assert allowed - BS < kept <= allowed  # just enough blocks evicted
        for i in range(store.num_layers):
            for h in range(store.kv_heads):
                pos = kept_positions(store, i, b * store.kv_heads + h)
                assert pos == sorted(pos) and pos[-8:] == list(range(n - 8, n))  # order kept, protected kept


def test_kv_compress_global_sort_prefers_the_low_metric_head():
    """Hand-made metrics: one global sort evicts from the head whose KVs matter least, across layers."""
    store = KVStore.empty(num_layers=2, batch=1, kv_heads=2, head_dim=4, block_size=4)
    for layer in store.layers:
        layer.append(torch.randn(1, 2, 32, 4), torch.randn(1, 2, 32, 4), torch.arange(32)[None, :])
    method = kvlab.make_method("kv-compress", ratio=0.25, pool_kernel=1, protected=4)
    low, high = torch.linspace(0, 1, 32), torch.linspace(10, 11, 32)
    method._metric = {0: torch.stack([low, high]), 1: torch.stack([high + 5, low + 0.5])}
    method.compress(store, torch.tensor([32]))
    # 128 KVs, keep 96: evict 8 blocks, all from the two low heads. Candidate scores (metric of the last KV
    # a block eviction removes): layer 0 head 0 at (4j-1)/31, layer 1 head 1 at 0.5 + (4j-1)/31, so the 8
    # lowest are 6 blocks of the first and 2 of the second.
    assert store.lengths().flatten().tolist() == [8, 32, 32, 24]
    assert kept_positions(store, 0, 0) == list(range(24, 32))
    assert kept_positions(store, 1, 1) == list(range(8, 32))


def test_kv_compress_options_change_the_choice(snapshot):
    def kept(store):
        return [kept_positions(store, i, row) for i in range(store.num_layers) for row in range(4)]

    base = compress(snapshot, kvlab.make_method("kv-compress", ratio=0.75))
    for params in ({"aggregation": "l1"}, {"pool_kernel": 1}, {"window": 32}):
        other = compress(snapshot, kvlab.make_method("kv-compress", ratio=0.75, **params))
        assert abs(int(other.lengths().sum()) - int(base.lengths().sum())) < 2 * BS and kept(other) != kept(base)


def test_kv_compress_sinks_and_token_budgets(snapshot):
    store = compress(snapshot, kvlab.make_method("kv-compress", ratio=0.9, n_sink=4))
    for i in range(store.num_layers):
        for row in range(store.batch * store.kv_heads):
            assert kept_positions(store, i, row)[:4] == [0, 1, 2, 3]
    store = compress(snapshot, kvlab.make_method("kv-compress", budget_tokens=64))
    assert all(64 * 4 - BS < int(store.lengths()[:, b].sum()) <= 64 * 4 for b in range(2))
    store = compress(snapshot, kvlab.make_method("kv-compress", max_cache_tokens=100))
    assert all(100 - BS < int(store.lengths()[:, b].sum()) <= 100 for b in range(2))


def test_kv_compress_continual_compression_holds_the_budget(model, snapshot):
    ratio, steps = 0.75, 9  # 8 decode steps: compressed after steps 4 and 8
    result = decode(model, snapshot, kvlab.make_method("kv-compress", ratio=ratio, interval=4), steps)
    once = decode(model, snapshot, kvlab.make_method("kv-compress", ratio=ratio), steps)
    for b, n in enumerate(snapshot.context_lengths.tolist()):
        full_now = (n + steps - 1) * result.kept_at_end.shape[0] * result.kept_at_end.shape[2]
        assert int(result.kept_at_end[:, b].sum()) <= (1 - ratio) * full_now  # compressed at the last step
    assert result.kept_at_end.sum() < once.kept_at_end.sum()


# --------------------------------------------------------------------- others
def test_ada_snapkv_head_lengths_differ_but_layer_totals_match(snapshot):
    store = compress(snapshot, kvlab.make_method("ada-snapkv", ratio=0.75, window=16))
    lengths = store.lengths()
    assert len(set(lengths.flatten().tolist())) > 2
    for b, n in enumerate(snapshot.context_lengths.tolist()):
        assert (lengths[:, b].sum(-1) == int(0.25 * n) * store.kv_heads).all()


def test_pyramidkv_budgets_shrink_with_depth(snapshot):
    store = compress(snapshot, kvlab.make_method("pyramidkv", ratio=0.5, window=16))
    lengths = store.lengths()[:, 0, 0]
    assert lengths[0] > lengths[1]


@pytest.mark.parametrize("name", ["h2o", "tova"])
def test_decode_eviction_holds_the_cache_size(model, snapshot, name):
    params = {"window": 16} if name == "h2o" else {}
    result = decode(model, snapshot, kvlab.make_method(name, ratio=0.5, **params), 6)
    assert torch.equal(result.kept_at_end, result.kept_after_prefill)


def test_snapkv_keeps_its_window_and_h2o_its_recent_tokens(snapshot):
    store = compress(snapshot, kvlab.make_method("snapkv", ratio=0.8, window=32))
    h2o = kvlab.make_method("h2o", ratio=0.8, window=32, recent_fraction=0.5)
    store_h2o = compress(snapshot, h2o)
    for b, n in enumerate(snapshot.context_lengths.tolist()):
        for h in range(2):
            assert kept_positions(store, 1, 2 * b + h)[-32:] == list(range(n - 32, n))
            recent = int(h2o.tokens_kept(n) * 0.5)  # int(300 * (1 - 0.8)) = 59, as in kvpress
            assert kept_positions(store_h2o, 1, 2 * b + h)[-recent:] == list(range(n - recent, n))


def test_tova_keeps_the_same_tokens_in_every_head(snapshot):
    store = compress(snapshot, kvlab.make_method("tova", ratio=0.6))
    for b in range(2):
        assert kept_positions(store, 0, 2 * b) == kept_positions(store, 0, 2 * b + 1)


def test_sliding_window_layers_are_left_alone():
    model, _ = kvlab.load("random:tiny-gemma3")
    snap = prefill(model, [list(range(1, 200))], observe=64)
    store = compress(snap, kvlab.make_method("kv-compress", ratio=0.5))
    for i, layer in enumerate(store.layers):
        if layer.sliding_window is not None:
            assert torch.equal(layer.lengths, snap.store.layers[i].lengths)
        else:
            assert int(layer.lengths.sum()) < int(snap.store.layers[i].lengths.sum())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_range_is_an_error(name, ratio):
    with pytest.raises(kvlab.KVLabError, match="ratio"):
        kvlab.make_method(name, ratio=ratio)


@pytest.mark.parametrize("name,params,match", [
    ("snapkv", {"window": 64}, "window"),
    ("pyramidkv", {"window": 64}, "window"),
    ("ada-snapkv", {"window": 64}, "window"),
    ("h2o", {"window": 64}, "window"),
    ("kv-compress-w32", {}, "window"),
])
def test_window_longer_than_a_sequence_is_an_error(model, name, params, match):
    snap = prefill(model, [list(range(1, 200)), list(range(1, 20))], observe=64)  # second one is short
    with pytest.raises(kvlab.KVLabError, match=match):
        compress(snap, kvlab.make_method(name, ratio=0.5, **params))


def test_protected_larger_than_budget_is_an_error(snapshot):
    with pytest.raises(kvlab.KVLabError, match="protected"):
        compress(snapshot, kvlab.make_method("kv-compress", budget_tokens=8, protected=16))
    with pytest.raises(kvlab.KVLabError, match="window"):
        compress(snapshot, kvlab.make_method("snapkv", budget_tokens=40))
    with pytest.raises(kvlab.KVLabError):
        kvlab.make_method("kv-compress", aggregation="max")
    with pytest.raises(kvlab.KVLabError):
        kvlab.make_method("kv-compress", ratio=0.5, max_cache_tokens=100)


# ------------------------------------------------------------------------ CLI
def test_cli_generate_and_bench_throughput(monkeypatch):
    from kvlab.cli import app

    monkeypatch.setenv("KVLAB_QUIET", "1")
    runner = CliRunner()
    out = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--method", "kv-compress", "--ratio",
                              "0.875", "--prompt", "y" * 300, "--max-new-tokens", "3", "--json"])
    assert out.exit_code == 0, out.output
    stats = json.loads(out.output)["stats"]
    assert stats["cache_mb_after_prefill"] < stats["cache_mb_full"]
    out = runner.invoke(app, ["bench", "throughput", "--model", "random:tiny-llama", "--batch", "2", "--context",
                              "160", "--new-tokens", "3", "--ratios", "0,0.5", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("full", 0.0), ("kv-compress", 0.5), ("snapkv", 0.5)]
    assert rows[1]["cache MB"] < rows[0]["cache MB"]


# ------------------------------------------------------------------ the scorer frame
def test_a_scorer_is_its_score(snapshot):
    """A new evictor needs only `score` (ScorerMethod's frame does the budget, the per-row top-k and the real
    eviction): keeping the newest tokens by position keeps exactly each row's last `budget` tokens."""
    from dataclasses import dataclass

    from kvlab.attention.probs import padded_layer
    from kvlab.methods.scorer import ScorerMethod

    @dataclass
    class Newest(ScorerMethod):
        def score(self, layer_idx, layer, ctx):
            _, pos = padded_layer(layer)
            return pos.float().masked_fill(pos < 0, float("-inf"))

    store = compress(snapshot, Newest(budget=0.25))
    for i in store.compressible_layers():
        for row in range(store.layers[i].rows):
            n = int(snapshot.context_lengths[row // store.kv_heads])
            assert kept_positions(store, i, row) == list(range(n - n // 4, n))
    assert store.bytes_in_use() < snapshot.store.bytes_in_use()


# ------------------------------------------------------------------ whole pages (what kvlab.vllm runs)
PAGED = [("snapkv", {"window": 16}), ("pyramidkv", {"window": 16, "beta": 4}), ("knorm", {}), ("random", {}),
         ("tova", {"decode_evict": False}), ("h2o", {"decode_evict": False})]


@pytest.mark.parametrize("name,params", PAGED, ids=[n for n, _ in PAGED])
def test_pages_of_one_token_keep_the_scorers_own_tokens(snapshot, name, params):
    """``page=1``: every token is a page, so the paged rule keeps exactly what the scorer keeps."""
    plain = compress(snapshot, kvlab.make_method(name, budget=0.5, **params))
    paged = compress(snapshot, kvlab.make_method(name, budget=0.5, page=1, **params))
    for i in range(plain.num_layers):
        # K-norm's layer-0 scores depend on the token alone (RoPE keeps norms): a repeated token ties, and the
        # two top-k break ties apart, so there the kept scores are compared
        scores = None
        if name == "knorm":
            scores = kvlab.make_method(name).score(i, snapshot.store.layers[i], None)
            scores = scores.reshape(-1, scores.shape[-1])
        for row in range(plain.layers[i].rows):
            a, b = kept_positions(paged, i, row), kept_positions(plain, i, row)
            if scores is not None:
                a, b = sorted(scores[row, a].tolist()), sorted(scores[row, b].tolist())
            assert a == b, (name, i, row)


@pytest.mark.parametrize("name,params", PAGED, ids=[n for n, _ in PAGED])
def test_whole_pages_per_layer_and_head(snapshot, name, params):
    """``page=32``: every KV head of a layer keeps the same whole pages' worth of the prompt's full pages (the
    most any layer needs, or per layer for PyramidKV), each head its own best tokens, and the partial last page."""
    method = kvlab.make_method(name, budget=0.5, page=32, **params)
    store = compress(snapshot, method)
    for b, n in enumerate(snapshot.context_lengths.tolist()):
        full, tail = n // 32 * 32, list(range(n // 32 * 32, n))
        counts = set()
        for i in range(store.num_layers):
            lengths = {len(kept_positions(store, i, b * store.kv_heads + h)) for h in range(store.kv_heads)}
            assert len(lengths) == 1, (name, i, lengths)  # one page count for every head of the layer
            kept = lengths.pop() - len(tail)
            assert kept % 32 == 0 and 0 < kept < full
            counts.add(kept // 32)
            for h in range(store.kv_heads):
                assert kept_positions(store, i, b * store.kv_heads + h)[-len(tail):] == tail
        assert (len(counts) > 1) == (name == "pyramidkv"), counts  # per layer only where budgets are


def test_pages_refused_where_a_paged_engine_cannot_keep_them():
    with pytest.raises(kvlab.KVLabError, match="decode_evict=false"):
        kvlab.make_method("h2o", budget=0.5, page=32)
    with pytest.raises(kvlab.KVLabError, match="per-head budgets"):
        kvlab.make_method("ada-snapkv", budget=0.5, page=32)
    with pytest.raises(kvlab.KVLabError, match="positive"):
        kvlab.make_method("snapkv", budget=0.5, page=0)


@pytest.mark.parametrize("name,params", PAGED, ids=[n for n, _ in PAGED])
def test_a_prompt_scored_outside_the_store_scores_as_inside(model, name, params):
    """``score_prompt`` (what kvlab.vllm calls on vLLM's pages) gives the scores the method gives in kvlab's store."""
    from kvlab.methods.scorer import score_prompt

    torch.manual_seed(1)
    snap = prefill(model, [torch.randint(0, 256, (200,)).tolist()], block_size=BS, observe=64)
    inside = kvlab.make_method(name, budget=0.5, **params)
    outside = kvlab.make_method(name, budget=0.5, **params)
    ctx = PrefillContext(context_lengths=snap.context_lengths.clone(), queries=snap.queries, scaling=snap.scaling,
                         num_query_heads=snap.num_query_heads)
    inside.prepare(snap.store, ctx)
    w = max(inside.observation_window(), 1)
    for i, layer in enumerate(snap.store.layers):
        keys, values, _ = layer.row_view(0)
        k = torch.stack([layer.row_view(h)[0] for h in range(layer.kv_heads)], 1)
        v = torch.stack([layer.row_view(h)[1] for h in range(layer.kv_heads)], 1)
        assert torch.equal(k[:, 0], keys) and torch.equal(v[:, 0], values)
        q = snap.queries[i][0, :, -w:].transpose(0, 1)  # [w, Hq, D]
        expect = inside.score(i, layer, ctx).reshape(layer.kv_heads, -1)
        got = score_prompt(outside, i, k, v, q, snap.scaling, prepare=i == 0)
        assert torch.allclose(got, expect, atol=1e-5, equal_nan=True), (name, i)
