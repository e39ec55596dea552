"""block-route, cluster-route and the oracles (issue 3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.attention.plans import ReadPlan
from kvlab.attention.probs import mass_recall
from kvlab.cache.store import KVStore
from kvlab.errors import KVLabError
from kvlab.generation import decode, prefill
from kvlab.methods import make_method
from kvlab.methods.base import Method, PrefillContext, StepPlan
from kvlab.methods.block_route import BlockMeta


@pytest.fixture(scope="module")
def qwen():
    """tiny-qwen2 (6 query heads over 2 KV heads), batch 2 with different lengths, prefilled once."""
    model, _ = kvlab.load("random:tiny-qwen2")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (150,), generator=gen).tolist(), torch.randint(0, 256, (97,), generator=gen).tolist()]
    snap = prefill(model, ids, block_size=16, reserve_tokens=16)
    full = decode(model, snap, make_method("full"), 6, return_logits=True).logits
    return model, snap, full


def _logits(model, snap, method):
    return decode(model, snap, method, 6, return_logits=True).logits


# ------------------------------------------------------------------ equivalence with full
@pytest.mark.parametrize("name,params", [
    ("block-route", {}), ("block-route", {"score": "bound", "block_size": 8, "score_block": 2}),
    ("cluster-route", {}), ("cluster-route", {"relayout": True}), ("oracle-tokens", {}), ("oracle-blocks", {}),
])
def test_budget_covering_context_equals_full(qwen, name, params):
    model, snap, full = qwen
    out = _logits(model, snap, make_method(name, budget=1.0, dense_layers=0, **params))
    assert (out - full).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["block-route", "cluster-route"])
def test_routed_batch_rows_with_budget_over_length_equal_full(qwen, name):
    """budget_tokens=120: sequence 0 (150 tokens) is routed, sequence 1 (97 tokens) reads all through the plan."""
    model, snap, full = qwen
    out = _logits(model, snap, make_method(name, budget_tokens=120, dense_layers=0))
    assert (out[1] - full[1]).abs().max() <= 1e-4  # read completely, through the sparse path
    assert (out[0] - full[0]).abs().max() > 1e-3  # really routed


@dataclass
class _AllBlocks(Method):
    """Test helper: a plan of every block (or every token), so the sparse paths run inside the model."""

    name: ClassVar[str] = "test-all-blocks"
    block_size: int = 8
    tokens: bool = False

    def decode_plan(self, layer_idx, layer, query, q_positions):
        if self.tokens:
            t = int(layer.lengths.max())
            idx = torch.arange(t).expand(layer.rows, t)
            idx = torch.where(idx < layer.lengths[:, None], idx, -1)
            return ReadPlan("tokens", idx.reshape(layer.batch, layer.kv_heads, t))
        nb = (layer.lengths + self.block_size - 1) // self.block_size
        w = int(nb.max())
        idx = torch.arange(w).expand(layer.rows, w)
        idx = torch.where(idx < nb[:, None], idx, -1)
        return ReadPlan("blocks", idx.reshape(layer.batch, layer.kv_heads, w), block_size=self.block_size)


@pytest.mark.parametrize("bs,tokens", [(8, False), (64, False), (256, False), (1, True)])
def test_sparse_paths_inside_the_model_equal_full(qwen, bs, tokens):
    """256-token blocks: a block reaches past its row's capacity, the last row's past the pool's end."""
    model, snap, full = qwen
    out = _logits(model, snap, _AllBlocks(block_size=bs, tokens=tokens))
    assert (out - full).abs().max() <= 1e-4


def test_routing_changes_logits_and_runs_on_llama():
    model, _ = kvlab.load("random:tiny-llama")
    snap = prefill(model, [list(range(7, 207))], block_size=16, reserve_tokens=8)
    full = decode(model, snap, make_method("full"), 4, return_logits=True).logits
    for name in ("block-route", "cluster-route"):
        out = decode(model, snap, make_method(name, budget=0.25, dense_layers=0), 4, return_logits=True).logits
        assert torch.isfinite(out).all() and (out - full).abs().max() > 1e-4


# ------------------------------------------------------------------ selection properties
def _store(batch=1, heads=2, t=200, d=16, seed=0, structured=False, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    store = KVStore.empty(2, batch, heads, d, block_size=16)
    layer = store.layers[1]
    if structured:  # a slowly drifting key direction: neighbouring tokens are similar (real keys are)
        steps = torch.randn(batch, heads, t, d, generator=gen) * 0.3
        keys = steps.cumsum(2) / (torch.arange(t)[None, None, :, None] + 1) ** 0.25
    else:
        keys = torch.randn(batch, heads, t, d, generator=gen)
    valid = torch.ones(batch, t, dtype=torch.bool)
    for b, n in enumerate(lengths or []):
        valid[b, : t - n] = False
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    layer.append(keys, torch.randn(batch, heads, t, d, generator=gen), pos, valid)
    return store, layer, gen


def _query(layer, groups, gen, scale=1.0):
    return torch.randn(layer.batch, layer.kv_heads * groups, 1, layer.head_dim, generator=gen) * scale


def _read(method, store, query, step=0, layer_idx=1):
    """What layer ``layer_idx`` reads for ``query`` at decode step ``step``: the method's plan of the step, made
    for the tokens the layer holds (the step's own token is in already: ``new_tokens=0``), then its selection."""
    plan = method.plan_step(store, StepPlan(step, new_tokens=0))
    return method.decode_plan(layer_idx, store.layers[layer_idx], query, plan)


def test_sink_and_newest_block_always_selected_batch_two_lengths():
    store, layer, gen = _store(batch=2, t=200, lengths=[200, 133])
    method = make_method("block-route", budget=0.4, dense_layers=0)
    for _ in range(5):
        plan = _read(method, store, _query(layer, 3, gen, 3.0))
        nb = ((layer.lengths + 15) // 16).view(2, 2)
        for b in range(2):
            for h in range(2):
                sel = plan.index[b, h][plan.index[b, h] >= 0].tolist()
                assert sel[0] == 0 and nb[b, h] - 1 in sel and nb[b, h] - 2 in sel
                assert len(sel) <= int(0.4 * int(layer.lengths[b * 2 + h])) // 16
                assert sel == sorted(set(sel))


def test_gqa_group_shares_one_selection_from_summed_scores():
    store, layer, gen = _store(heads=2, t=320)
    method = make_method("block-route", budget=0.2, dense_layers=0, local_blocks=1)
    q = _query(layer, 4, gen, 4.0)
    plan = _read(method, store, q)
    assert plan.index.shape[:2] == (1, 2)  # one selection per KV head, read by its 4 query heads
    # permuting query heads inside a group does not change the selection ...
    perm = torch.tensor([3, 1, 0, 2, 4, 6, 5, 7])
    assert torch.equal(_read(method, store, q[:, perm]).index, plan.index)
    # ... and it is the top-k of the group's summed centroid scores
    scores = method.block_scores(1, layer, q)
    manual = scores.clone()
    manual[:, 0] = manual[:, -1] = torch.inf
    k = int(0.2 * 320) // 16
    expect = manual.topk(k, dim=1).indices.sort(1).values
    assert torch.equal(plan.index.view(2, -1), expect)
    # the score really is the sum over the group
    meta = method._meta[1]
    qg = q.view(2, 4, 16).sum(1)
    assert torch.allclose(scores[0], meta.centroid[0, :20] @ qg[0], atol=1e-4)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_recall_bounds(structured, seed):
    _, layer, gen = _store(heads=2, t=400, seed=seed, structured=structured)
    scaling = 0.25
    ctx = PrefillContext(context_lengths=torch.tensor([400]), queries={}, scaling=scaling, num_query_heads=6)
    store = KVStore(layers=[layer, layer], block_size=16)
    recalls = {}
    for name, params in [("oracle-tokens", {}), ("oracle-blocks", {}), ("block-route", {}),
                         ("block-route-bound", {"score": "bound"})]:
        m = make_method(name.replace("-bound", ""), budget=0.125, dense_layers=0, **params)
        m.prefill_end(store, ctx)
        q = _query(layer, 3, torch.Generator().manual_seed(seed + 10), 2.0)
        plan = _read(m, store, q)
        recalls[name] = mass_recall(layer, q, scaling, plan).view(2, 3).mean(-1)  # per KV head
    eps = 1e-5
    assert (recalls["oracle-tokens"] >= recalls["oracle-blocks"] - eps).all()
    assert (recalls["oracle-blocks"] >= recalls["block-route"] - eps).all()
    assert (recalls["oracle-blocks"] >= recalls["block-route-bound"] - eps).all()
    assert (recalls["oracle-tokens"] > recalls["block-route"]).any()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), d=st.integers(1, 24), groups=st.integers(1, 4),
       scale=st.floats(0.01, 100.0))
def test_bound_score_is_an_upper_bound(seed, n, d, groups, scale):
    """Quest's bound Σ_i max(q_i min_i, q_i max_i), summed over a GQA group, is ≥ Σ_g q_g·k for every k of the block."""
    gen = torch.Generator().manual_seed(seed)
    store = KVStore.empty(1, 1, 1, d, block_size=16)
    layer = store.layers[0]
    keys = torch.randn(1, 1, n, d, generator=gen) * scale
    layer.append(keys, keys, torch.arange(n)[None, :])
    method = make_method("block-route", budget_tokens=1, score="bound", block_size=64, dense_layers=0)
    q = torch.randn(1, groups, 1, d, generator=gen) * scale
    bound = method.block_scores(0, layer, q)[0, 0]
    exact = (keys[0, 0].double() @ q[0, :, 0].double().T).sum(-1)  # [n]
    assert float(bound) >= float(exact.max()) - 1e-4 * (1 + abs(float(exact.max())))


def test_block_metadata_updates_incrementally():
    _, layer, gen = _store(heads=2, t=100)
    meta = BlockMeta(16)
    meta.update(layer)
    assert meta.blocks_recomputed == 7 * 2
    for _ in range(20):  # decode-style appends, crossing a block boundary
        k = torch.randn(1, 2, 1, 16, generator=gen)
        layer.append(k, k, layer.lengths[:1].view(1, 1))
        meta.update(layer)
        assert meta.blocks_recomputed <= 2 * 2  # only the partial last block (or two at a boundary)
    fresh = BlockMeta(16)
    fresh.update(layer)
    nb = 8
    assert torch.allclose(meta.centroid[:, :nb], fresh.centroid[:, :nb], atol=1e-6)
    assert torch.equal(meta.kmin[:, :nb], fresh.kmin[:, :nb]) and torch.equal(meta.kmax[:, :nb], fresh.kmax[:, :nb])
    keys = layer.row_view(0)[0]
    assert torch.allclose(fresh.centroid[0, 7], keys[112:].mean(0), atol=1e-6)  # the partial last block


def test_refresh_reuses_selection_plus_newest_blocks():
    store, layer, gen = _store(heads=2, t=256)
    method = make_method("block-route", budget=0.25, refresh=4, dense_layers=0)
    first = _read(method, store, _query(layer, 2, gen, 3.0)).index
    for step in range(1, 4):
        k = torch.randn(1, 2, 1, 16, generator=gen)
        layer.append(k, k, layer.lengths[:1].view(1, 1))
        plan = _read(method, store, _query(layer, 2, gen, 3.0), step)
        nb = int((layer.lengths[0] + 15) // 16)
        for h in range(2):
            sel = set(plan.index[0, h][plan.index[0, h] >= 0].tolist())
            assert set(first[0, h][first[0, h] >= 0].tolist()) <= sel and nb - 1 in sel
    k = torch.randn(1, 2, 1, 16, generator=gen)
    layer.append(k, k, layer.lengths[:1].view(1, 1))
    _read(method, store, _query(layer, 2, gen, 3.0), 4)  # step 4: re-selected
    assert method._prev[1] is not first


# ------------------------------------------------------------------ cluster-route
def test_cluster_route_relayout_makes_clusters_contiguous(qwen):
    model, snap, full = qwen
    plain = make_method("cluster-route", budget=0.5, dense_layers=0)
    relaid = make_method("cluster-route", budget=0.5, dense_layers=0, relayout=True)
    a = _logits(model, snap, plain)
    b = _logits(model, snap, relaid)
    assert (a - b).abs().max() <= 1e-4  # same tokens read, only their order in memory differs
    assert relaid.stats["relayout_seconds"] > 0
    # after relayout the selected slots form far fewer runs
    store = snap.store.clone()
    ctx = PrefillContext(snap.context_lengths, {}, snap.scaling, 6)

    def runs(method):
        method.prefill_end(store if method is plain else store2, ctx)
        layer = (store if method is plain else store2).layers[1]
        q = torch.randn(2, 6, 1, layer.head_dim, generator=torch.Generator().manual_seed(3))
        idx = _read(method, store if method is plain else store2, q).index.view(layer.rows, -1)
        return sum(int(((r[1:] != r[:-1] + 1) & (r[1:] >= 0)).sum()) + 1 for r in idx)

    store2 = snap.store.clone()
    assert runs(relaid) < runs(plain)


def test_cluster_route_takes_whole_clusters_within_budget():
    store, layer, gen = _store(heads=2, t=300, structured=True)
    ctx = PrefillContext(torch.tensor([300]), {}, 0.25, 4)
    method = make_method("cluster-route", budget=0.25, dense_layers=0, cluster_size=16)
    method.prefill_end(store, ctx)
    state = method._layers[1]
    plan = _read(method, store, _query(layer, 2, gen))
    for h in range(2):
        sel = plan.index[0, h][plan.index[0, h] >= 0]
        assert len(sel) <= 75 and 0 in sel.tolist() and 299 in sel.tolist()
        middle = sel[(sel >= 16) & (sel < (19 - 2) * 16)]
        clusters = state.assign[h, middle].unique()
        for c in clusters.tolist():  # every chosen cluster is read whole
            members = ((state.assign[h, : 17 * 16] == c).nonzero().flatten())
            assert set(members.tolist()) <= set(sel.tolist())


def test_cluster_route_assigns_new_tokens():
    store, layer, gen = _store(heads=1, t=160)
    ctx = PrefillContext(torch.tensor([160]), {}, 0.25, 2)
    method = make_method("cluster-route", budget=0.5, dense_layers=0, recluster=4)
    method.prefill_end(store, ctx)
    for step in range(40):
        k = torch.randn(1, 1, 1, 16, generator=gen)
        layer.append(k, k, layer.lengths[:1].view(1, 1))
        _read(method, store, _query(layer, 2, gen), step)
    assign = method._layers[1].assign[0, :200]
    local_start = (13 - 2) * 16
    assert (assign[16:local_start] >= 0).all()  # everything that left the window belongs to a cluster


# ------------------------------------------------------------------ diagnostic, bad input, profile, bench
def test_recall_diagnostic_on_request(qwen):
    model, snap, _ = qwen
    m = make_method("block-route", budget=0.5, dense_layers=0, record_recall=True)
    decode(model, snap, m, 3)
    assert len(m.recall_log) == 2 * 2  # 2 steps x 2 layers
    r = m.recall_log[0]["recall"]
    assert r.shape == (2, 6) and (r > 0).all() and (r <= 1 + 1e-6).all() and (r < 0.999).any()
    quiet = make_method("block-route", budget=0.5, dense_layers=0)
    decode(model, snap, quiet, 3)
    assert quiet.recall_log == []


def test_bad_input_errors(qwen, tmp_path, monkeypatch):
    model, snap, _ = qwen
    with pytest.raises(KVLabError, match="smaller than sink_blocks"):
        decode(model, snap, make_method("block-route", budget=0.1, dense_layers=0), 2)
    with pytest.raises(KVLabError, match="power of two"):
        make_method("block-route", block_size=24)
    with pytest.raises(KVLabError, match="larger than the context"):
        decode(model, snap, make_method("block-route", block_size=128, budget=0.9, dense_layers=0), 2)
    with pytest.raises(KVLabError, match="allowed layers 0..1"):
        decode(model, snap, make_method("block-route", budget=0.5, dense_layers="0,5"), 2)
    with pytest.raises(KVLabError, match="allowed 0..2"):
        decode(model, snap, make_method("cluster-route", budget=0.5, dense_layers=3), 2)
    with pytest.raises(KVLabError, match="kvlab profile entropy"):
        make_method("block-route", dense_layers="auto")
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    with pytest.raises(KVLabError, match="kvlab profile entropy --model tiny"):
        make_method("block-route", dense_layers="auto", dense_layers_profile="tiny")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny-entropy.json").write_text(json.dumps({"dense_layers": [1]}))
    m = make_method("block-route", budget=0.5, dense_layers="auto", dense_layers_profile="tiny")
    decode(model, snap, m, 2)
    assert m._dense == {1} and 1 not in m._meta and 0 in m._meta


def test_bench_attention_small_and_cuda_message():
    from kvlab.experiments.bench_attention import bench_attention

    result = bench_attention(contexts=(2048,), kv_heads=2, q_heads=4, head_dim=32, repeats=1)
    paths = {r["path"] for r in result["rows"]}
    assert {"full", "block-route bs=16 centroid", "block-route bs=64 centroid", "token gather"} <= paths
    assert all(r["ms"] > 0 and r["tokens_read_per_head"] <= 2048 for r in result["rows"])
    if not torch.cuda.is_available():
        with pytest.raises(KVLabError, match="no CUDA device"):
            bench_attention(device="cuda")
