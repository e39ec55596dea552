"""The paged store: layout, appends, compaction, memory accounting, and the attention paths over it."""

from __future__ import annotations

import pytest
import torch

from kvlab.attention import attend
from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import KVStore
from kvlab.errors import KVLabError


def filled_store(lengths=(37, 20), heads=2, dim=8, block=4, layers=1, seed=0) -> KVStore:
    g = torch.Generator().manual_seed(seed)
    store = KVStore.empty(layers, batch=len(lengths), kv_heads=heads, head_dim=dim, block_size=block)
    t = max(lengths)
    valid = torch.zeros(len(lengths), t, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, t - n:] = True
    pos = (torch.cumsum(valid.long(), 1) - 1).clamp(min=0)
    for layer in store.layers:
        k = torch.randn(len(lengths), heads, t, dim, generator=g)
        v = torch.randn(len(lengths), heads, t, dim, generator=g)
        layer.append(k, v, pos, valid)
    return store


def test_append_keeps_tokens_in_order_with_positions():
    store = filled_store()
    layer = store.layers[0]
    assert layer.lengths.tolist() == [37, 37, 20, 20]
    for row, n in enumerate([37, 37, 20, 20]):
        _, _, pos = layer.row_view(row)
        assert pos.tolist() == list(range(n))
    table = layer.block_table()
    assert table.shape == (2, 2, 10)
    assert (table[1, :, 5:] == -1).all() and (table[1, :, :5] >= 0).all()


def test_memory_accounting_is_tensor_storage():
    store = filled_store(lengths=(37, 20), heads=2, dim=8, block=4, layers=3)
    expected = 0
    for layer in store.layers:
        slots = int(layer.capacity.sum()) * 4
        # K and V (fp32) + positions (int64) + three int64 vectors of block metadata per row
        expected += slots * 8 * 4 * 2 + slots * 8 + 3 * 4 * 8
    assert store.bytes_allocated() == expected
    assert store.bytes_in_use() == 3 * (37 * 2 + 20 * 2) * 8 * 4 * 2


def test_repack_frees_memory_and_keeps_survivors():
    store = filled_store(lengths=(64, 64), heads=2, dim=8, block=4)
    layer = store.layers[0]
    before = layer.kv_bytes_allocated()
    k0 = layer.row_view(1)[0].clone()
    keep = torch.zeros(4, 64, dtype=torch.bool)
    keep[0, :8] = True  # row 0 keeps 8 tokens
    keep[1, ::2] = True  # row 1 keeps every other token (32)
    keep[2:, :] = True  # rows 2 and 3 keep everything
    layer.repack(keep=keep)
    assert layer.lengths.tolist() == [8, 32, 64, 64]
    assert layer.kv_bytes_allocated() == (8 + 32 + 64 + 64) * 8 * 4 * 2
    assert layer.kv_bytes_allocated() < before
    assert torch.equal(layer.row_view(1)[0], k0[::2])
    assert layer.row_view(1)[2].tolist() == list(range(0, 64, 2))
    assert not layer.uniform


def test_block_size_must_be_power_of_two():
    with pytest.raises(KVLabError, match="power of two"):
        KVStore.empty(1, 1, 1, 8, block_size=12)


def test_clone_is_independent():
    store = filled_store()
    copy = store.clone()
    copy.layers[0].repack(keep=torch.zeros(4, 37, dtype=torch.bool))
    assert store.layers[0].lengths.tolist() == [37, 37, 20, 20]


def _reference_attention(layer, q, q_pos, scale):
    """Per row, per query head: softmax over the visible keys, written out longhand."""
    b, hq, _, d = q.shape
    g = hq // layer.kv_heads
    out = torch.zeros(b, 1, hq, d)
    for row in range(layer.rows):
        bi, hi = divmod(row, layer.kv_heads)
        k, v, kpos = layer.row_view(row)
        vis = kpos <= q_pos[bi, 0]
        for j in range(g):
            s = (q[bi, hi * g + j, 0] @ k[vis].T) * scale
            out[bi, 0, hi * g + j] = torch.softmax(s, -1) @ v[vis]
    return out


def test_dense_ragged_and_plan_paths_agree():
    store = filled_store(lengths=(37, 20), heads=2, dim=8, block=4)
    layer = store.layers[0]
    q = torch.randn(2, 6, 1, 8)
    q_pos = torch.tensor([[37], [20]])
    ref = _reference_attention(layer, q, q_pos, 0.3)
    assert layer.uniform
    torch.testing.assert_close(attend(layer, q, q_pos, 0.3), ref, atol=1e-5, rtol=1e-5)
    everything = ReadPlan("tokens", torch.arange(37).expand(2, 2, 37).clone())
    everything.index[1, :, 20:] = -1
    torch.testing.assert_close(attend(layer, q, q_pos, 0.3, everything), ref, atol=1e-5, rtol=1e-5)
    all_blocks = ReadPlan("blocks", torch.arange(10).expand(2, 2, 10).clone())
    torch.testing.assert_close(attend(layer, q, q_pos, 0.3, all_blocks), ref, atol=1e-5, rtol=1e-5)
    # Make the layout ragged (drop one token of row 0): the ragged path must agree with the longhand.
    keep = torch.ones(4, 37, dtype=torch.bool)
    keep[0, 5] = False
    layer.repack(keep=keep, reserve_tokens=3)
    assert not layer.uniform
    torch.testing.assert_close(attend(layer, q, q_pos, 0.3), _reference_attention(layer, q, q_pos, 0.3),
                               atol=1e-5, rtol=1e-5)


def test_append_grows_capacity_when_full():
    store = filled_store(lengths=(5,), heads=1, dim=4, block=4)
    layer = store.layers[0]
    for step in range(40):
        layer.append(torch.full((1, 1, 1, 4), float(step)), torch.zeros(1, 1, 1, 4), torch.tensor([[5 + step]]))
    assert layer.lengths.tolist() == [45]
    k, _, pos = layer.row_view(0)
    assert pos.tolist() == list(range(45))
    assert k[5:, 0].tolist() == [float(s) for s in range(40)]


def _host_copies_match(layer):
    assert layer.lengths_host == layer.lengths.tolist()
    assert layer.start_host == layer.start.tolist() and layer.capacity_host == layer.capacity.tolist()


def test_host_copies_follow_every_change():
    """Decode plans from the host copies of the row metadata: they must equal the device tensors after
    appends (prefill and decode), growth, repacks and in-place compaction."""
    g = torch.Generator().manual_seed(3)
    store = filled_store(lengths=(37, 20), heads=2, dim=8, block=4)
    layer = store.layers[0]
    _host_copies_match(layer)
    version = layer.layout_version
    for step in range(30):  # decode appends: a fixed-shape slot write; the layer grows when full
        k = torch.randn(2, 2, 1, 8, generator=g)
        layer.append_decode(k, k, torch.tensor([[37 + step], [20 + step]]))
        _host_copies_match(layer)
    assert layer.layout_version != version and layer.lengths_host == [67, 67, 50, 50]
    keep = torch.rand(4, 67, generator=g) < 0.6
    layer.repack(keep=keep)
    _host_copies_match(layer)
    layer.ensure_room(9)
    _host_copies_match(layer)
    assert all(n + 9 <= c * 4 for n, c in zip(layer.lengths_host, layer.capacity_host, strict=True))


def test_compact_in_place_keeps_the_live_tokens_in_order_and_the_pool():
    """Decode-time eviction marks slots dead; compaction moves each row's live tokens to its front in place
    (the pool and the layout stay: a captured CUDA graph stays valid)."""
    from kvlab.methods._scoring import mark_dead

    g = torch.Generator().manual_seed(4)
    store = filled_store(lengths=(37, 20), heads=2, dim=8, block=4)
    layer = store.layers[0]
    layer.repack(keep=torch.rand(4, 37, generator=g) < 0.8, reserve_tokens=6)  # ragged rows
    assert not layer.uniform
    before = [layer.row_view(r) for r in range(layer.rows)]
    before = [(k.clone(), p.clone()) for k, _, p in before]
    victims = torch.tensor([0, 5, 3, 1])
    mark_dead(layer, victims, torch.tensor([True, True, False, True]))
    layer.holes = True
    pointer, version = layer.keys.data_ptr(), layer.layout_version
    expected = [n - (1 if dead else 0) for n, dead in zip(layer.lengths_host, [True, True, False, True], strict=True)]
    layer.compact(expected)
    assert layer.keys.data_ptr() == pointer and layer.layout_version == version and not layer.holes
    _host_copies_match(layer)
    for row, (k0, p0) in enumerate(before):
        keep = torch.ones(len(p0), dtype=torch.bool)
        if row != 2:
            keep[victims[row]] = False
        k, _, p = layer.row_view(row)
        assert torch.equal(p, p0[keep]) and torch.equal(k, k0[keep])
    # a keep mask drops more, and the slots past the new lengths read as empty
    layer.compact([n - 2 for n in layer.lengths_host], keep=torch.arange(40)[None, :].expand(4, 40) >= 2)
    _host_copies_match(layer)
    for row in range(layer.rows):
        first = layer.start_host[row] * 4
        assert (layer.positions[first + layer.lengths_host[row]: first + layer.capacity_host[row] * 4] == -1).all()
