"""The experiments: metric functions against hand-computed cases, deterministic task generators with their
gold answers in (or, unanswerable, absent from) the context, and each experiment end to end on a tiny
random model, producing well-formed results and plots."""

from __future__ import annotations

import math

import pytest
import torch

import kvlab
from kvlab.experiments import access, entropy, locality, metrics, niah, ppl, report, runner, synthetic
from kvlab.experiments.runner import Cells, resolve, run_method, truncate
from kvlab.experiments.texts import code_files, prose_files, text_tokens
from kvlab.generation import prefill


@pytest.fixture(scope="module")
def tiny():
    return kvlab.load("random:tiny-llama")


# ----------------------------------------------------------------------------- metrics
def test_normalized_entropy_hand_cases():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    out = metrics.normalized_entropy(w)
    assert out.tolist() == pytest.approx([1.0, 0.0, 0.5], abs=1e-6)  # log 2 / log 4 = 0.5
    # Only two visible keys, uniform over them: entropy 1.
    vis = torch.tensor([[True, True, False, False]])
    assert metrics.normalized_entropy(torch.tensor([[0.5, 0.5, 0, 0]]), vis).item() == pytest.approx(1.0)
    # One visible key: defined as 0.
    assert metrics.normalized_entropy(torch.tensor([[1.0, 0]]), torch.tensor([[True, False]])).item() == 0.0


def test_region_mass_hand_case():
    key_pos = torch.arange(10)
    q_pos = torch.tensor([9])
    w = torch.zeros(1, 10)
    w[0, 0], w[0, 1], w[0, 8], w[0, 5] = 0.4, 0.1, 0.3, 0.2  # sink = {0,1}, local (distance < 3) = {7,8,9}
    r = metrics.region_mass(w, key_pos, q_pos, sink=2, local=3)
    assert r["sink"].item() == pytest.approx(0.5)
    assert r["local"].item() == pytest.approx(0.3)
    assert r["elsewhere"].item() == pytest.approx(0.2)


def test_distance_mass_hand_case():
    buckets = metrics.distance_buckets(8)
    assert buckets == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]
    w = torch.zeros(1, 9)
    w[0, 8], w[0, 7], w[0, 5], w[0, 0] = 0.1, 0.2, 0.3, 0.4  # distances 0, 1, 3, 8
    d = metrics.distance_mass(w, torch.arange(9), torch.tensor([8]), buckets)
    assert d[0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.0, 0.4])


def test_global_eviction_ratio_and_consensus_hand_cases():
    heads = [{1, 2}, {2, 3}]
    assert metrics.global_eviction_ratio(heads, [1, 4]) == 0.5  # 4 kept by no head; 1 kept by head 0
    assert metrics.global_eviction_ratio(heads, [2]) == 0.0
    assert metrics.global_eviction_ratio(heads, []) == 0.0
    assert metrics.global_eviction_ratio([torch.tensor([5])], [5, 6, 7, 8]) == 0.75
    assert metrics.head_consensus(heads) == pytest.approx(1 / 3)  # |{2}| / |{1,2,3}|
    assert metrics.head_consensus([{1}, {1}, {1}]) == 1.0
    assert metrics.head_consensus([{1, 2}]) == 1.0
    assert metrics.head_consensus([{1}, {2}, {1}]) == pytest.approx(1 / 3)  # pairs: 0, 1, 0


def test_token_f1_and_abstention():
    assert metrics.token_f1("the Blue scarf", "blue") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert metrics.token_f1("Blue.", "blue") == 1.0
    assert metrics.token_f1("red", "blue") == 0.0
    assert metrics.token_f1("I don't know.", metrics.ABSTAIN) == 1.0
    assert metrics.token_f1("Lisbon", metrics.ABSTAIN) == 0.0
    assert metrics.is_abstention("The text does not say.")
    assert not metrics.is_abstention("Oslo")


def test_boundary_layer():
    assert metrics.boundary_layer([0.9, 0.9, 0.2, 0.2]) == (2, pytest.approx(0.7))
    b, drop = metrics.boundary_layer([0.5, 0.5, 0.5])
    assert drop == pytest.approx(0.0)


# ----------------------------------------------------------------------------- inputs
def test_real_text_sources():
    assert code_files() and prose_files()


def test_text_tokens_seeded(tiny):
    _, tok = tiny
    a, b = text_tokens(tok, "prose", 300, seed=1), text_tokens(tok, "prose", 300, seed=1)
    assert a == b and len(a) == 300
    assert text_tokens(tok, "code", 300, seed=1) != a


def test_synthetic_deterministic_and_gold_in_context(tiny):
    _, tok = tiny
    a = synthetic.generate(tok, seed=3, length=1200)
    b = synthetic.generate(tok, seed=3, length=1200)
    c = synthetic.generate(tok, seed=4, length=1200)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert [p.ids for p in a] != [p.ids for p in c]
    tasks = {(p.meta["task"], p.meta["direction"]) for p in a}
    assert tasks == {(t, d) for t in synthetic.TASKS for d in ("s2a", "a2s")}
    assert {p.meta["hops"] for p in a if p.meta["task"] == "multihop"} == {2, 3, 4}
    for p in a:
        assert len(p.ids) == 1200
        context = synthetic.context_text(tok, p)
        if p.meta["answerable"]:
            assert p.gold in context
            relevant = tok.decode([p.ids[i] for i in p.relevant])
            assert p.gold in relevant or p.meta["task"] == "multihop"
            assert p.relevant and max(p.relevant) < p.context_end
        else:
            assert p.gold == metrics.ABSTAIN and metrics.ABSTAIN not in context
            assert p.relevant == []
            asked = p.meta["question"]
            if p.meta["direction"] == "s2a":  # the giver asked about never appears
                giver = asked.split(" that ")[1].split(" gave")[0]
                assert giver not in context
            else:  # no item of that color was given
                color_item = asked.split(" the ", 1)[1].rstrip("?")
                assert color_item not in context
    unans = [p for p in a if not p.meta["answerable"]]
    assert len(unans) == 2


def test_niah_prompts_exact_and_needle_located(tiny):
    _, tok = tiny
    batch = niah.prompts(tok, 700, [0.0, 0.5, 1.0], "passkey", seed=2)
    assert [len(p.ids) for p in batch] == [700, 700, 700]
    starts = [p.relevant[0] for p in batch]
    assert starts[0] < starts[1] < starts[2]
    for p in batch:
        assert p.gold in tok.decode([p.ids[i] for i in p.relevant])
    assert niah.prompts(tok, 700, [0.5], "sentence", seed=2)[0].ids == niah.prompts(tok, 700, [0.5], "sentence",
                                                                                       seed=2)[0].ids


# ----------------------------------------------------------------------------- runner
def test_truncate_matches_a_shorter_prefill(tiny):
    model, tok = tiny
    ids = [text_tokens(tok, "prose", 200, 0)]
    snap = prefill(model, ids, capture=[120], chunk_size=1024)
    short = prefill(model, [ids[0][:120]], chunk_size=1024)
    t = truncate(snap, 120)
    for a, b in zip(t.store.layers, short.store.layers, strict=True):
        ka, _, pa = a.row_view(0)
        kb, _, pb = b.row_view(0)
        assert torch.equal(pa, pb) and torch.allclose(ka, kb, atol=1e-5)
    assert torch.allclose(snap.captured[120].logits, short.logits, atol=1e-4)
    # Teacher forcing through "full" from the truncated snapshot scores the next tokens like the long prefill.
    res = run_method(model, t, kvlab.make_method("full"), [ids[0][120:130]], 0)
    assert res.forced_nll.shape == (1, 10) and torch.isfinite(res.forced_nll).all()


def test_truncate_sliding_window_layers():
    """Gemma-style sliding layers keep only their window: a truncated snapshot must use the copy taken at
    the capture point, and then decodes exactly like a prefill of the shorter prompt."""
    model, tok = kvlab.load("random:tiny-gemma3")
    ids = [text_tokens(tok, "prose", 200, 0)]
    snap = prefill(model, ids, capture=[120], chunk_size=64)
    short = prefill(model, [ids[0][:120]], chunk_size=1024)
    forced = [ids[0][120:128]]
    a = run_method(model, truncate(snap, 120), kvlab.make_method("full"), forced, 0)
    b = run_method(model, short, kvlab.make_method("full"), forced, 0)
    assert torch.allclose(a.forced_nll, b.forced_nll, atol=1e-4)


def test_resolve_runs_fixed_setting_methods_once_and_refuses_unknown_ones():
    notes: list[str] = []
    specs = resolve(["full", "streaming", "low-rank", "quantize"], notes)
    assert [s.label for s in specs] == ["full", "streaming", "low-rank (own setting)", "quantize (own setting)"]
    assert [s.budgets([0.5, 0.25]) for s in specs] == [[1.0], [0.5, 0.25], [1.0], [1.0]]
    assert specs[3].make(0.25).describe()["bits"] == 8  # no budget passed to a fixed-setting method
    assert any("'quantize' takes no budget" in n and "bits=8" in n for n in notes)
    with pytest.raises(kvlab.KVLabError, match="unknown method"):
        resolve(["no-such-method"], [])


def test_every_method_in_report_order_by_family():
    """The experiments run (and tables list) every registered method, grouped by its family."""
    labels = [s.label for s in resolve(None, [])]
    assert labels == ["full", "block-route", "cluster-route", "cluster-route+relayout", "oracle-tokens",
                      "oracle-blocks", "streaming", "kv-compress", "kv-compress-w32", "snapkv", "pyramidkv", "h2o",
                      "tova", "knorm", "random", "ada-snapkv", "low-rank (own setting)", "quantize (own setting)",
                      "local-global (own setting)", "cross-layer (own setting)"]


# ----------------------------------------------------------------------------- experiments end to end
METHODS = ["full", "block-route", "snapkv", "streaming", "quantize"]


def test_locality_and_entropy_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    pool = runner.TextPool(model, tok, ["prose", "code"], [128, 256])
    cells = locality.profile_cells(pool, Cells(tmp_path / "cells"), "random:tiny-llama")
    assert len(cells) == 4
    for c in cells:
        for layer in c["layers"]:
            for s, lo, e in zip(layer["sink"], layer["local"], layer["elsewhere"], strict=True):
                assert s + lo + e == pytest.approx(1.0, abs=1e-4)
            assert sum(layer["buckets"]) == pytest.approx(1.0, abs=1e-4)
            assert all(0 <= x <= 1 + 1e-6 for x in layer["entropy"])
    s = locality.summarize_cells(cells)
    assert s["verdict"] in ("supported", "not supported", "inconclusive") and len(s["rows"]) == 2
    e = entropy.summarize_cells(cells, "random:tiny-llama")
    path = entropy.save_profile(e)
    assert path.is_file() and entropy.load_profile("random:tiny-llama")["dense_layers"] == e["dense_layers"]
    assert entropy.verdict([e])["verdict"] in ("supported", "not supported", "inconclusive")


def test_access_bench_small():
    res = access.bench_access([2048, 4096], reps=1)
    blocks = {r["block"] for r in res["rows"]}
    assert blocks == {"full", "all", 1, 4, 16, 64, 256}
    assert all(r["seconds"] > 0 and r["gbps"] > 0 for r in res["rows"])
    tokens = {r["tokens"] for r in res["rows"] if r["context"] == 2048 and isinstance(r["block"], int)}
    assert tokens == {256}  # equal budget for every block size
    with pytest.raises(kvlab.KVLabError, match="smaller than one block"):
        access.bench_access([512], reps=1)
    assert access.summarize_bench(res)["verdict"] in ("supported", "not supported", "inconclusive")
    assert res["copy_gbps"] > 0


def test_niah_ppl_synthetic_end_to_end_with_plots(tiny, tmp_path):
    model, tok = tiny
    notes: list[str] = []
    specs = resolve(METHODS, notes)
    cells = Cells(tmp_path / "cells")
    nd = niah.run_cells(model, tok, "tiny", specs, [400], [0.0, 1.0], [0.25], ["passkey"], cells, notes,
                        max_new_tokens=4)
    assert {c["mode"] for c in nd} >= {"aware"}
    for c in nd:
        assert len(c["rows"]) == 2 and all(isinstance(r["correct"], bool) for r in c["rows"])
        assert all(0 <= g <= 1 for r in c["rows"] for g in r["ger_per_layer"])
    full = [c for c in nd if c["method"] == "full"][0]
    assert all(g == 0 for r in full["rows"] for g in r["ger_per_layer"])  # the full cache evicts nothing
    pool = runner.TextPool(model, tok, ["prose", "code"], [256], extra=16)
    pd = ppl.run_cells(pool, "tiny", specs, [0.25], [256], 6, cells, notes)
    assert all(c["tokens"] == 5 and all(math.isfinite(v) for v in c["ppl"].values()) for c in pd)
    sd = synthetic.run_cells(model, tok, "tiny", specs, [0.5, 0.9], 1200, cells, notes, max_new_tokens=3)
    ss = synthetic.summarize_cells(sd)
    assert {r["method"] for r in ss["rows"]} == {s.label for s in specs}
    for r in ss["rows"]:
        assert 0 <= r["f1"] <= 1 and 0 <= r["hallucination"] <= 1 and 0 <= r["ger"] <= 1
        assert all(0 <= x <= 1 for x in r["consensus_per_layer"])
    if "snapkv" in {s.label for s in specs}:
        snap90 = [r for r in ss["rows"] if r["method"] == "snapkv" and r["ratio"] == 0.9][0]
        assert snap90["ger"] > 0  # evicting 90% loses some answer tokens from every head
    # Report with these sections renders, with every plot embedded.
    from kvlab.experiments import validate

    results = {"model": "tiny", "mode": "quick", "machine": access.machine(), "experiments": {
        "niah": niah.summarize({"cells": nd}, validate.QUICK), "ppl": ppl.summarize({"cells": pd}, validate.QUICK),
        "synthetic": synthetic.summarize({"cells": sd}, validate.QUICK)}, "notes": notes, "conclusion": ["x"]}
    path = report.write_report(results, tmp_path / "out")
    html = path.read_text()
    pngs = list((tmp_path / "out").glob("*.png"))
    assert len(pngs) >= 4 and html.count("data:image/png;base64,") == len(pngs)
