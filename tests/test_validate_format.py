"""A ``kvlab validate`` output directory written by the code before the experiments became modules with
``run`` and ``summarize`` (commit 76b2a66) is read the same way by the code now: its results.json is
summarised into the same sections and the same summary.md, and a run of the same configuration caches its
cells under the same keys (so a run in progress from older code resumes, and its report can be written
again with this tree).

``fixtures/validate_format/`` holds that run's results.json and summary.md and the names of its cell files:
:func:`run_fixture_config` on ``random:tiny-llama`` at 76b2a66, one torch thread (the test's own
configuration: every section, in the 1.5B run's shape -- prefill stages, one prefill per text, perplexity
continuing the profile texts, the synthetic set in parts with a focused family, H3 and consensus on a
second model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvlab
from kvlab.experiments import report, validate
from kvlab.experiments.study import Config

FIXTURE = Path(__file__).parent / "fixtures" / "validate_format"
METHODS = ["full", "block-route", "cluster-route", "snapkv"]
CONFIG = Config(
    profile_lengths=[128, 256], kinds=["prose", "code"], access_contexts=[2048], access_reps=1, e2e_budget=0.5,
    e2e_steps=2, niah_lengths=[384], niah_depths=[0.5], niah_kinds=["passkey"], niah_budgets=[0.25],
    ppl_lengths=[256], ppl_tokens=4, ppl_budgets=[0.5], synthetic_length=1200, synthetic_ratios=[0.5, 0.9],
    synthetic_per_task=1, methods=METHODS, other_model_lengths=[128], h3_models=["random:tiny-qwen2"],
    order=["synthetic", "h3", "ppl", "niah", "h1", "h2"], synthetic_focus={"instance/s2a": 2}, synthetic_batch=8,
    synthetic_methods=METHODS, ppl_methods=METHODS, niah_methods=METHODS, ppl_from_profile=True,
    pool_per_kind=True, profile_stages=[[128], [256]], consensus_model="random:tiny-llama",
    consensus_methods=["block-route", "snapkv"], consensus_ratios=[0.5], exclude=["cluster-route+relayout"],
    fixed_in_niah=False,
)
# What each experiment's run returns: the keys of its section that hold its data.
DATA = {"h1": ("cells",), "h3": ("models", "profiles", "main_all_lengths"), "h2": ("bench", "e2e"),
        "niah": ("cells",), "ppl": ("cells",), "synthetic": ("cells", "consensus_compare")}


def run_fixture_config(out: Path) -> dict:
    model, tok = kvlab.load("random:tiny-llama")
    return validate.run_validate("random:tiny-llama", out, "full", config=CONFIG, model=model, tokenizer=tok,
                                 device_bench=False)


@pytest.fixture(scope="module")
def old() -> dict:
    return json.loads((FIXTURE / "results.json").read_text())


def _json(x: object) -> str:
    return json.dumps(x, sort_keys=True, default=float)


def test_the_fixture_is_that_configuration(old):
    assert Config(**old["config"]) == CONFIG
    assert list(old["experiments"]) == CONFIG.order


def test_old_results_are_summarised_into_the_same_sections(old):
    cfg = Config(**old["config"])
    assert set(old["experiments"]) == set(validate.EXPERIMENTS) == set(DATA)
    for name, section in old["experiments"].items():
        new = validate.EXPERIMENTS[name].summarize({k: section[k] for k in DATA[name]}, cfg)
        if name == "h1":  # the one change: the staged run's kinds and lengths were the first stage's, repeated
            assert section["measurement"].count("prose, code, prose, code at 128 tokens;") == 1
            assert "for prose, code at 128, 256 tokens;" in new["measurement"]
            new["measurement"] = section["measurement"]
        assert _json(new) == _json(section), name
    assert validate.conclusion(old["experiments"]) == old["conclusion"]


def test_old_results_give_the_same_summary_md(old):
    assert report.markdown(old) == (FIXTURE / "summary.md").read_text()
    cfg = Config(**old["config"])
    again = {**old, "experiments": {name: validate.EXPERIMENTS[name].summarize(
        {k: section[k] for k in DATA[name]}, cfg) for name, section in old["experiments"].items()}}
    assert report.markdown(json.loads(json.dumps(again, default=float))) == (FIXTURE / "summary.md").read_text()


def test_the_same_configuration_caches_the_same_cells(tmp_path, monkeypatch):
    """The cell file names are hashes of the cell keys: the same names, the same keys (the access benchmark's
    key names the machine, so it is left out)."""
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    res = run_fixture_config(tmp_path / "out")
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out" / "cells").rglob("*.json"))
    expected = (FIXTURE / "cells.txt").read_text().split()
    assert [n for n in names if not n.startswith("cells/access/")] == \
        [n for n in expected if not n.startswith("cells/access/")]
    assert len(names) == len(expected) == 42
    assert list(res["experiments"]) == CONFIG.order and res["notes"] == json.loads(
        (FIXTURE / "results.json").read_text())["notes"]
