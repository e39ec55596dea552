"""The CPU sparse attention paths (blocks as runs, tokens by gather) against the per-row reference."""

from __future__ import annotations

import pytest
import torch

from kvlab.attention import attend
from kvlab.attention.plans import ReadPlan
from kvlab.attention.sparse import WORKSPACE, attend_blocks, attend_tokens, copy_unit, merge_runs
from kvlab.attention.torch_attention import attend_plan, attend_plan_reference
from kvlab.cache.store import KVStore


def _layer(store_bs: int, window: int | None = None, batch: int = 2, heads: int = 2, d: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    store = KVStore.empty(1, batch, heads, d, block_size=store_bs, sliding_windows=[window])
    layer = store.layers[0]
    t = 70
    valid = torch.ones(batch, t, dtype=torch.bool)
    if batch > 1:
        valid[1, :13] = False  # the second sequence is shorter (left padded, padding not stored)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    layer.append(torch.randn(batch, heads, t, d), torch.randn(batch, heads, t, d), pos, valid)
    return layer


def _random_blocks(layer, bs: int, gen: torch.Generator) -> torch.Tensor:
    nb = (layer.lengths + bs - 1) // bs
    rows = []
    for n in nb.tolist():
        keep = torch.rand(n, generator=gen) < 0.5
        keep[-1] = True  # the partial newest block
        rows.append(keep.nonzero().flatten())
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), -1)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
    return idx.view(layer.batch, layer.kv_heads, width)


@pytest.mark.parametrize("store_bs", [4, 16])
@pytest.mark.parametrize("bs", [1, 2, 8, 32])
def test_blocks_match_reference(store_bs, bs):
    layer = _layer(store_bs)
    gen = torch.Generator().manual_seed(bs)
    q = torch.randn(2, 6, 1, 16)  # 3 query heads per KV head
    qpos = torch.tensor([[70], [57]])
    idx = _random_blocks(layer, bs, gen)
    ref = attend_plan_reference(layer, q, qpos, 0.25, ReadPlan("blocks", idx, block_size=bs))
    for mode in ("blocks", "runs"):
        out = attend_blocks(layer, q, qpos, 0.25, idx, bs, mode=mode)
        assert out.shape == (2, 1, 6, 16)
        assert torch.allclose(out, ref, atol=1e-6), (mode, (out - ref).abs().max())
    assert torch.allclose(attend_plan(layer, q, qpos, 0.25, ReadPlan("blocks", idx, block_size=bs)), ref, atol=1e-6)


def test_all_blocks_equal_dense_and_tokens_paths():
    layer = _layer(16)
    q = torch.randn(2, 6, 1, 16)
    qpos = torch.tensor([[70], [57]])
    dense = attend(layer, q, qpos, 0.25)
    idx = torch.arange(9).expand(2, 2, 9).clone()
    idx[1, :, 8] = -1  # the shorter row has 8 blocks of 8
    assert torch.allclose(attend_blocks(layer, q, qpos, 0.25, idx, 8), dense, atol=1e-6)
    slots = torch.arange(70).expand(2, 2, 70).clone()
    slots[1, :, 57:] = -1
    for mode in ("gather", "runs", "auto"):
        assert torch.allclose(attend_tokens(layer, q, qpos, 0.25, slots, mode), dense, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_tokens_several_queries_and_window(window):
    layer = _layer(8, window=window)
    q = torch.randn(2, 6, 3, 16)
    qpos = torch.tensor([[40, 50, 69], [20, 30, 56]])
    idx = torch.tensor([[[0, 5, 6, 7, 30, 50], [1, 2, 3, -1, -1, -1]], [[4, 9, 40, 41, -1, -1], [0, 1, 2, 3, 56, -1]]])
    ref = attend_plan_reference(layer, q, qpos, 0.25, ReadPlan("tokens", idx))
    for mode in ("gather", "runs"):
        assert torch.allclose(attend_tokens(layer, q, qpos, 0.25, idx, mode), ref, atol=1e-6)


def test_workspace_is_reused_between_steps():
    layer = _layer(16)
    q = torch.randn(2, 6, 1, 16)
    qpos = torch.tensor([[70], [57]])
    idx = torch.tensor([[[0, 2, 4], [0, 1, 4]], [[0, 3, -1], [1, 2, 3]]])
    WORKSPACE.clear()
    attend_blocks(layer, q, qpos, 0.25, idx, 16)
    first = {k: v.data_ptr() for k, v in WORKSPACE._buffers.items()}
    attend_blocks(layer, q, qpos, 0.25, idx, 16)
    assert first and first == {k: v.data_ptr() for k, v in WORKSPACE._buffers.items()}


def test_merge_runs_and_copy_unit():
    starts, counts = merge_runs(torch.tensor([0, 1, 2, 5, 7, 8]))
    assert starts.tolist() == [0, 5, 7] and counts.tolist() == [3, 1, 2]
    layer = _layer(4)
    assert copy_unit(layer, 2) == 2
    assert copy_unit(layer, 64) <= 64 and all(int(s) * 4 % copy_unit(layer, 64) == 0 for s in layer.start)
