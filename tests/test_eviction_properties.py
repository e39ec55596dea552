"""Property tests (hypothesis): over random lengths, ratios and block sizes, eviction never drops a
protected token, keeps each row's order, stays within its budget and gives the memory back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.cache.store import KVStore
from kvlab.generation import left_pad, positions_from_valid
from kvlab.methods.base import PrefillContext

LAYERS, KV_HEADS, Q_HEADS, DIM = 2, 2, 4, 8


def synthetic(lengths: list[int], block_size: int, window: int, seed: int) -> tuple[KVStore, PrefillContext]:
    """A store holding random keys for left-padded prompts of ``lengths``, and random observed queries."""
    gen = torch.Generator().manual_seed(seed)
    _, valid = left_pad([[1] * n for n in lengths])
    positions = positions_from_valid(valid)
    b, t = valid.shape
    store = KVStore.empty(num_layers=LAYERS, batch=b, kv_heads=KV_HEADS, head_dim=DIM, block_size=block_size)
    queries = {}
    for i, layer in enumerate(store.layers):
        k = torch.randn(b, KV_HEADS, t, DIM, generator=gen)
        layer.append(k, torch.randn(b, KV_HEADS, t, DIM, generator=gen), positions, valid)
        queries[i] = torch.randn(b, Q_HEADS, window, DIM, generator=gen)
    ctx = PrefillContext(context_lengths=valid.sum(1), queries=queries, scaling=DIM**-0.5, num_query_heads=Q_HEADS)
    return store, ctx


def positions_of(store: KVStore, layer: int, row: int) -> list[int]:
    return store.layers[layer].row_view(row)[2].tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    block_size=st.sampled_from([1, 2, 4, 8, 16, 32]),
    ratio=st.floats(0.0, 0.97),
    protected=st.integers(0, 12),
    n_sink=st.integers(0, 4),
    window=st.integers(1, 8),
    pool_kernel=st.sampled_from([1, 3, 7]),
    seed=st.integers(0, 2**16),
)
def test_kv_compress_never_drops_a_protected_token(lengths, block_size, ratio, protected, n_sink, window,
                                                    pool_kernel, seed):
    method = kvlab.make_method("kv-compress", ratio=ratio, protected=protected, n_sink=n_sink, window=window,
                               pool_kernel=pool_kernel)
    store, ctx = synthetic(lengths, block_size, window, seed)
    before = store.bytes_allocated()
    try:
        method.prefill_end(store, ctx)
    except kvlab.KVLabError as exc:
        # only two reasons are allowed: a prompt shorter than the window, or protected tokens over budget
        short = min(lengths) < window
        over = any(LAYERS * KV_HEADS * min(n, protected + n_sink) > int((1 - ratio) * n * LAYERS * KV_HEADS)
                   for n in lengths)
        assert short or over, str(exc)
        event("refused")
        return
    event("compressed")
    for b, n in enumerate(lengths):
        must_keep = set(range(max(0, n - protected), n)) | set(range(min(n_sink, n)))
        kept_total = 0
        for i in range(LAYERS):
            for h in range(KV_HEADS):
                pos = positions_of(store, i, b * KV_HEADS + h)
                assert must_keep <= set(pos)
                assert pos == sorted(pos) and len(set(pos)) == len(pos) and all(0 <= p < n for p in pos)
                kept_total += len(pos)
        if ratio > 0:
            assert kept_total <= int((1 - ratio) * n * LAYERS * KV_HEADS)
    rows = LAYERS * len(lengths) * KV_HEADS
    slot = 2 * DIM * 4 + 8
    assert store.bytes_allocated() <= (1 - ratio) * before + rows * block_size * slot


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["snapkv", "pyramidkv", "ada-snapkv", "h2o", "tova", "knorm", "random"]),
    lengths=st.lists(st.integers(1, 80), min_size=1, max_size=3),
    block_size=st.sampled_from([1, 4, 16]),
    ratio=st.floats(0.0, 0.95),
    window=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_baselines_keep_their_window_and_budget(name, lengths, block_size, ratio, window, seed):
    params = {"window": window} if name in ("snapkv", "pyramidkv", "ada-snapkv", "h2o") else {}
    method = kvlab.make_method(name, ratio=ratio, **params)
    store, ctx = synthetic(lengths, block_size, max(window, 1), seed)
    try:
        method.prefill_end(store, ctx)
    except kvlab.KVLabError as exc:
        assert "window" in str(exc)  # prompt shorter than the window, or budget below the window
        event("refused")
        return
    event("compressed")
    protected = window if name in ("snapkv", "pyramidkv", "ada-snapkv") else 1 if name == "tova" else 0
    for b, n in enumerate(lengths):
        per_layer = []
        for i in range(LAYERS):
            kept = 0
            for h in range(KV_HEADS):
                pos = positions_of(store, i, b * KV_HEADS + h)
                assert set(range(max(0, n - protected), n)) <= set(pos)
                assert pos == sorted(pos) and len(set(pos)) == len(pos)
                kept += len(pos)
            per_layer.append(kept)
        if ratio > 0 and name != "pyramidkv":
            assert all(k <= KV_HEADS * max(1, int((1 - ratio) * n)) for k in per_layer)


@pytest.mark.parametrize("block_size", [1, 16])
def test_eviction_at_full_budget_changes_nothing(block_size):
    store, ctx = synthetic([40, 25], block_size, 8, 0)
    ref = store.clone()
    for name in ["kv-compress", "snapkv", "h2o", "tova", "knorm", "random", "ada-snapkv", "pyramidkv"]:
        params = {"window": 8} if name in ("snapkv", "pyramidkv", "ada-snapkv", "h2o") else {}
        kvlab.make_method(name, ratio=0.0, **params).prefill_end(store, ctx)
        assert torch.equal(store.lengths(), ref.lengths())
        assert store.bytes_allocated() == ref.bytes_allocated()
