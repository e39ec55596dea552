"""Routing physics and the cross-model comparisons on hand-made rows: conditional accuracy, the cliff, the
GER spike and its correlation with accuracy, the verdict rule, the focused synthetic set, ε per text kind,
entropy profiles over relative depth and head consensus by layer."""

from __future__ import annotations

import pytest

import kvlab
from kvlab.experiments import entropy, locality, metrics, runner, study, synthetic, validate


# ----------------------------------------------------------------------------- metric functions
def test_conditional_accuracy_counts_only_what_the_full_cache_answers():
    correct = {"a": True, "b": False, "c": True, "d": False}
    assert metrics.conditional_accuracy(correct, {"a", "b"}) == 0.5
    assert metrics.conditional_accuracy(correct, {"a", "c"}) == 1.0
    assert metrics.conditional_accuracy(correct, {"d"}) == 0.0
    assert metrics.conditional_accuracy(correct, set()) is None
    assert metrics.conditional_accuracy(correct, {"zz"}) is None  # asked of no question this method saw


def test_cliff_is_the_first_ratio_below_half_of_full():
    ratios = [0.0, 0.5, 0.8, 0.9, 0.95]
    assert metrics.cliff(ratios, [1.0, 0.9, 0.7, 0.4, 0.1], 1.0) == 0.9
    assert metrics.cliff(ratios, [1.0, 0.9, 0.7, 0.5, 0.5], 1.0) is None  # exactly half is not below it
    assert metrics.cliff(list(reversed(ratios)), [0.1, 0.4, 0.7, 0.9, 1.0], 1.0) == 0.9  # order of the input
    assert metrics.cliff(ratios, [1.0, None, 0.2, 0.1, 0.0], 1.0) == 0.8  # missing points are skipped
    assert metrics.cliff(ratios, [0.4, 0.4, 0.3, 0.3, 0.3], 0.8) == 0.8  # 0.4 is not below 0.5 × 0.8
    assert metrics.cliff(ratios, [0.0] * 5, 0.0) is None


def test_pearson_and_spike_hand_cases():
    assert metrics.pearson([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)
    assert metrics.pearson([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0)
    assert metrics.pearson([0, 1, 2], [1, 1, 1]) is None
    assert metrics.pearson([0, 1], [1, 0]) is None
    # 1, 2, 1, 0 against 0, 1, 2, 3: deviations 0, 1, 0, -1 and -1.5, -0.5, 0.5, 1.5: sum of products -2
    assert metrics.pearson([1, 2, 1, 0], [0, 1, 2, 3]) == pytest.approx(-2 / (2 ** 0.5 * 5 ** 0.5))
    assert metrics.spike([0.0, 0.5, 0.8, 0.9], [0.0, 0.1, 0.2, 0.8]) == 0.9
    assert metrics.spike([0.9, 0.0, 0.5], [0.8, 0.0, 0.6]) == 0.5  # sorted by ratio first
    assert metrics.spike([0.5], [0.3]) is None
    # an uneven grid: the wide step 0.5 -> 0.8 rises most (0.32) but least steeply; 0.9 -> 0.95 is steepest
    assert metrics.spike([0.0, 0.5, 0.8, 0.85, 0.9, 0.95], [0.0, 0.10, 0.42, 0.53, 0.69, 0.93]) == 0.95


# ----------------------------------------------------------------------------- summaries on hand-made rows
def _row(qid: str, right: bool, ger: float, task: str = "instance", direction: str = "s2a",
         answerable: bool = True, cons: tuple[float, ...] = (1.0, 1.0, 1.0)) -> dict:
    return {"qid": qid, "task": task, "direction": direction, "answerable": answerable, "gold": "x",
            "answer": "x" if right else "y", "f1": 1.0 if right else 0.0, "abstained": False,
            "ger_per_layer": [ger] * len(cons), "consensus_per_layer": list(cons)}


def _cells(acc_by_ratio: dict[float, float], ger_by_ratio: dict[float, float], n: int = 40,
           method: str = "m") -> list[dict]:
    """A full cell where questions q0..q{n-1} are right except the last quarter, and one method whose
    accuracy on the solved ones and GER per ratio are given."""
    solved = [f"q{i}" for i in range(3 * n // 4)]
    full = {"method": "full", "ratio": 0.0, "rows": [_row(f"q{i}", f"q{i}" in solved, 0.0) for i in range(n)]}
    cells = [full]
    for r, acc in acc_by_ratio.items():
        k = round(acc * len(solved))
        rows = [_row(q, i < k, ger_by_ratio[r]) for i, q in enumerate(solved)]
        rows += [_row(f"q{i}", False, ger_by_ratio[r]) for i in range(len(solved), n)]
        cells.append({"method": method, "ratio": r, "rows": rows})
    return cells


def test_summarize_conditional_accuracy_cliff_and_correlation():
    ratios = [0.1, 0.5, 0.8, 0.9, 0.95]
    cells = _cells(dict(zip(ratios, [1.0, 0.9, 0.8, 0.3, 0.1], strict=True)),
                   dict(zip(ratios, [0.0, 0.05, 0.1, 0.6, 0.8], strict=True)))
    s = synthetic.summarize_cells(cells)
    assert s["solved"] == 30
    by = {(r["method"], r["ratio"]): r for r in s["rows"]}
    assert by[("full", 0.0)]["cond_accuracy"] == 1.0 and by[("full", 0.0)]["accuracy"] == 0.75
    assert by[("m", 0.5)]["cond_accuracy"] == pytest.approx(0.9)
    assert by[("m", 0.5)]["accuracy"] == pytest.approx(27 / 40)
    c = s["curves"]["m"]
    assert c["ratios"] == [0.0] + ratios  # ratio 0 is the full cache
    assert c["cliff"] == 0.9 and c["ger_spike"] == 0.9
    assert c["correlation"] < -0.9
    assert synthetic.cliff_tracks_ger(c)
    assert s["families"]["instance/s2a"] == {"n": 40, "solved": 30, "accuracy": 0.75} and s["cannot"] == []


def test_families_the_model_cannot_do_are_named():
    cells = _cells({0.5: 1.0}, {0.5: 0.0}, n=8)
    cells[0]["rows"] += [_row(f"h{i}", False, 0.0, task="multihop") for i in range(5)]
    s = synthetic.summarize_cells(cells)
    assert s["families"]["multihop/s2a"]["solved"] == 0
    assert s["cannot"] == ["multihop/s2a"]


def test_synthetic_verdict_rule():
    cfg = study.Config(**{**validate.FULL_1_5B.__dict__, "synthetic_ratios": [0.1, 0.5, 0.8, 0.9, 0.95]})
    ratios = cfg.synthetic_ratios
    near = _cells(dict(zip(ratios, [1.0, 0.95, 0.8, 0.3, 0.1], strict=True)),
                  dict(zip(ratios, [0.0, 0.05, 0.1, 0.6, 0.8], strict=True)))
    assert synthetic.summarize({"cells": near}, cfg)["verdict"] == "supported"
    early = _cells(dict(zip(ratios, [1.0, 0.2, 0.1, 0.1, 0.0], strict=True)),
                   dict(zip(ratios, [0.0, 0.05, 0.1, 0.6, 0.8], strict=True)))
    sec = synthetic.summarize({"cells": early}, cfg)
    assert sec["verdict"] == "not supported" and sec["near_90"] == []
    few = _cells(dict(zip(ratios, [1.0, 0.95, 0.8, 0.3, 0.1], strict=True)),
                 dict(zip(ratios, [0.0, 0.05, 0.1, 0.6, 0.8], strict=True)), n=20)  # 15 solved
    sec = synthetic.summarize({"cells": few}, cfg)
    assert sec["verdict"] == "inconclusive" and "fewer than the 30" in sec["text"]


# ----------------------------------------------------------------------------- the focused synthetic set
def test_focus_extends_the_base_set_with_the_same_questions():
    _, tok = kvlab.load("random:tiny-llama")
    base = synthetic.generate(tok, seed=0, length=1200, n_per_task=1)
    more = synthetic.generate(tok, seed=0, length=1200, n_per_task=1, focus={"instance/s2a": 3, "coref/s2a": 2})
    by_id = {p.meta["qid"]: p for p in more}
    assert len(by_id) == len(more)  # question ids are unique
    for p in base:  # every base question is in the larger set, token for token
        assert by_id[p.meta["qid"]].ids == p.ids
    extra = [p for p in more if p.meta["qid"] not in {q.meta["qid"] for q in base}]
    fams = sorted(synthetic.family_of(p.meta["task"], p.meta["direction"]) for p in extra)
    # instance/s2a: instances 1 and 2; coref/s2a: instance 1, answerable and not
    assert fams == ["coref/s2a", "coref/s2a", "instance/s2a", "instance/s2a"]
    with pytest.raises(kvlab.KVLabError, match="unknown task family"):
        synthetic.generate(tok, seed=0, length=1200, focus={"cooking/s2a": 2})


def test_the_1_5b_full_set_is_sized_for_thirty_answers():
    cfg = validate.config_for("qwen2.5-coder-1.5b", "full")
    assert cfg is validate.FULL_1_5B and validate.config_for("qwen2.5-coder-0.5b", "full") is validate.FULL
    assert {0.85, 0.9, 0.95} <= set(cfg.synthetic_ratios) and min(cfg.synthetic_ratios) == 0.1
    _, tok = kvlab.load("random:tiny-llama")
    prompts = synthetic.generate(tok, cfg.seed, cfg.synthetic_length, cfg.synthetic_per_task,
                                 focus=cfg.synthetic_focus)
    # the families the 1.5B model answers with the full cache (docs/validate-1.5b): instance in both
    # directions, tracking forwards
    single_fact = [p for p in prompts if p.meta["task"] == "instance"
                   or (p.meta["task"] == "tracking" and p.meta["direction"] == "s2a")]
    assert len(single_fact) >= 30


# ----------------------------------------------------------------------------- H1 per kind, H3 across models
def _profile(kind: str, length: int, eps: list[float], entropy_: list[float] | None = None) -> dict:
    layers = [{"elsewhere": [e, e], "sink": [0.0, 0.0], "local": [1 - e, 1 - e],
               "entropy": [h, h], "buckets": [1.0]} for e, h in zip(eps, entropy_ or eps, strict=True)]
    return {"kind": kind, "length": length, "layers": layers, "sink_tokens": 16, "local_tokens": 128,
            "buckets": [[0, 1]]}


def test_locality_reports_each_text_kind():
    cells = [_profile("code", 4096, [0.01, 0.02, 0.03, 0.2]), _profile("prose", 4096, [0.3, 0.4, 0.5, 0.6])]
    s = locality.summarize_cells(cells)
    assert s["by_kind"]["code"]["verdict"] == "supported"  # 3 of 4 layers below 0.05
    assert s["by_kind"]["prose"]["verdict"] == "not supported"
    assert s["by_kind"]["code"]["rows"][0]["mean_eps"] == pytest.approx(0.065)
    assert s["by_kind"]["code"]["rows"][0]["most_local_layers"] == [0, 1, 2]
    assert s["verdict"] == "not supported"  # the mean over kinds: ε 0.155 .. 0.4
    assert "code supported" in s["summary"] and "prose not supported" in s["summary"]


def test_entropy_profiles_compared_over_relative_depth():
    assert entropy.on_relative_depth([0.0, 1.0], points=5) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    a = {"model": "a", "entropy_per_layer": [0.9, 0.5, 0.4, 0.3]}
    b = {"model": "b", "entropy_per_layer": [0.9, 0.7, 0.5, 0.45, 0.4, 0.35, 0.3]}
    c = {"model": "c", "entropy_per_layer": [0.3, 0.4, 0.9]}
    res = entropy.compare([a, b, c])
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["b"]["correlation"] > 0.9 and rows["c"]["correlation"] < 0
    assert rows["b"]["lowest_at"] == [1.0, 1.0] and rows["c"]["lowest_at"] == [1.0, 0.0]
    assert entropy.compare([a]) is None


def test_consensus_shape_and_comparison():
    assert synthetic.consensus_shape([0.9, 0.9, 0.6, 0.5, 0.3, 0.3])["shape"] == "early consensus"
    assert synthetic.consensus_shape([0.3, 0.3, 0.5, 0.6, 0.9, 0.9])["shape"] == "funnel"
    assert synthetic.consensus_shape([0.5] * 6)["shape"] == "flat"
    small = [{"method": "m", "ratio": 0.9, "rows": [_row("q1", True, 0.5, cons=(0.9, 0.5, 0.2))]}]
    large = [{"method": "m", "ratio": 0.9, "rows": [_row("q1", True, 0.5, cons=(0.2, 0.5, 0.9)),
                                                   _row("q2", True, 0.5, cons=(0.0, 0.0, 0.0))]}]
    res = synthetic.consensus_compare({"small": small, "large": large}, ["m"], [0.9])
    assert res["questions"] == 1  # only the question both models were asked
    assert res["models"]["small"]["m@0.9"]["shape"] == "early consensus"
    assert res["models"]["large"]["m@0.9"]["shape"] == "funnel"
    assert res["models"]["large"]["m@0.9"]["per_layer"] == [0.2, 0.5, 0.9]


def test_a_pool_shrinks_to_what_perplexity_needs_and_prefills_again_past_it(monkeypatch):
    import torch

    model, tok = kvlab.load("random:tiny-llama")
    calls = []
    real = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    pool = runner.TextPool(model, tok, ["code"], [64, 128], first_index=1)
    both = runner.TextPool(model, tok, ["prose", "code"], [64, 128], total=pool.total)
    assert pool.ids[0] == both.ids[1]  # a one-kind pool holds the same text as that kind's row
    k64 = pool.at(64)[0].store.layers[0].row_view(0)[0].clone()
    pool.shrink(64)
    assert len(calls) == 1 and pool.at(64)[0].store.layers[0].lengths.max() == 64
    assert torch.equal(pool.at(64)[0].store.layers[0].row_view(0)[0], k64)
    assert len(calls) == 1
    pool.at(128)  # past what it kept: prefilled again, not a wrong snapshot
    assert len(calls) == 2
