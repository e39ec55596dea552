"""RULER through lm-eval (kvlab.experiments.ruler): samples, lm-eval's scoring, the question split, the cell cache,
the command's refusals, and one task through kvlab's engine and kvpress's pipeline on the real 0.5B model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import kvlab
from kvlab.cli import app
from kvlab.errors import KVLabError
from kvlab.experiments import ruler
from kvlab.experiments.runner import Cells, spec
from kvlab.models.builtin import BUILTIN_MODELS, ensure_converted

pytest.importorskip("lm_eval")  # installed by `make test` (the [ruler] extra)
MODEL = "qwen2.5-coder-0.5b"
LENGTH = 1024
NEW = 12


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(ensure_converted(BUILTIN_MODELS[MODEL]))


@pytest.fixture(scope="module")
def samples(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ruler") / "samples.json"
    return ruler.load_samples(path, model_dir, ["niah_single_1"], LENGTH, 2), path


@pytest.fixture(scope="module")
def loaded():
    return kvlab.load(MODEL)


def test_six_tasks_build_offline_and_the_rest_are_refused():
    assert ruler.check_tasks(["ruler_vt", "niah_single_1"]) == ["ruler_vt", "niah_single_1"]
    with pytest.raises(KVLabError, match="downloads Paul Graham essays"):
        ruler.check_tasks(["niah_single_2"])
    with pytest.raises(KVLabError, match="unknown RULER task 'ruler_nope'; allowed: niah_single_1"):
        ruler.check_tasks(["ruler_nope"])


def test_samples_are_lm_evals_prompts_saved_and_reused(samples, model_dir, monkeypatch):
    got, path = samples
    assert [s.key for s in got] == ["niah_single_1/0", "niah_single_1/1"]
    for s in got:
        assert s.prompt.startswith(s.doc["input"]) and s.prompt.endswith(s.doc["gen_prefix"])
        assert s.question.startswith("\nWhat is the special magic number for")
        assert s.doc["outputs"][0] in s.context  # the needle is in the context, not the question
        assert s.max_new_tokens == 128 and s.scorer.endswith(":process_results")
    monkeypatch.setattr(ruler, "generate", lambda *a, **k: pytest.fail("samples generated again"))
    assert ruler.load_samples(path, model_dir, ["niah_single_1"], LENGTH, 1) == got[:1]


def test_saved_samples_are_extended_never_replaced(samples, tmp_path, monkeypatch):
    got, path = samples
    copy = tmp_path / "samples.json"
    copy.write_text(path.read_text())
    redrawn = [dataclasses.replace(s, prompt="another draw") for s in got]
    extra = dataclasses.replace(got[0], index=2, prompt="a third sample")
    monkeypatch.setattr(ruler, "generate", lambda *a, **k: [*redrawn, extra])
    more = ruler.load_samples(copy, "dir/qwen2.5-coder-0.5b", ["niah_single_1"], LENGTH, 3)
    assert more == [*got, extra]  # the answered samples kept, the new index added
    assert ruler.load_samples(copy, "x/qwen2.5-coder-0.5b", ["niah_single_1"], LENGTH, 3) == more  # saved
    with pytest.raises(KVLabError, match="holds RULER samples for"):
        ruler.load_samples(copy, "dir/qwen2.5-coder-0.5b", ["niah_single_1"], 2048, 1)


def test_lm_evals_scoring_of_a_right_and_a_wrong_answer(samples):
    s = samples[0][0]
    assert ruler.score(s, f" {s.doc['outputs'][0]}. The grass is green.") == 1.0
    assert ruler.score(s, " 1234567") == 0.0


def test_the_question_split_in_tokens(samples, loaded):
    _, tok = loaded
    s = samples[0][0]
    ids, ctx_end = ruler.token_split(tok, s)
    assert ids == tok(s.prompt)["input_ids"]
    context, question = tok.decode(ids[:ctx_end]), tok.decode(ids[ctx_end:])
    assert question.endswith(s.question) and len(question) <= len(s.question) + 2  # ".\n" is one token
    assert s.context.startswith(context) and s.doc["outputs"][0] in context


def test_kvlab_engine_both_modes_and_the_cell_cache(samples, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    got, _ = samples
    cells, notes = Cells(tmp_path), []
    specs = [spec("full"), spec("snapkv"), spec("block-route")]
    run = ruler.run_kvlab(model, tok, MODEL, got, specs, [0.5], ["aware", "agnostic"], cells, notes, LENGTH, NEW)
    assert notes == []
    by = {(c["task"], c["index"], c["method"], c["mode"]): c for c in run}
    # full: aware and agnostic; snapkv: both; block-route routes per step, so only question-aware
    assert sorted({k[2:] for k in by}) == [("block-route", "aware"), ("full", "agnostic"), ("full", "aware"),
                                           ("snapkv", "agnostic"), ("snapkv", "aware")]
    for s in got:
        full = by[(s.task, s.index, "full", "aware")]
        assert full["score"] == 1.0, full["answer"]  # the uncompressed 0.5B finds the needle at 1K
        assert by[(s.task, s.index, "full", "agnostic")]["answer"] == full["answer"]  # nothing compressed
    monkeypatch.setattr(ruler, "prefill", lambda *a, **k: pytest.fail("a cached cell was run again"))
    again = ruler.run_kvlab(model, tok, MODEL, got, specs, [0.5], ["aware", "agnostic"], cells, notes, LENGTH, NEW)
    assert [c["answer"] for c in again] == [c["answer"] for c in run]
    board = ruler.leaderboard(run, [0.5])
    assert board[0]["method"] == "full" and board[0]["0"] == 100.0


def test_kvpress_engine_answers_as_kvlab_does_where_they_keep_the_same_tokens(samples, loaded, tmp_path):
    pytest.importorskip("kvpress")
    from kvlab.experiments.ruler_kvpress import run_kvpress

    model, tok = loaded
    got, _ = samples
    cells = Cells(tmp_path)
    runs = [("full", 0.0), ("snapkv", 0.5), ("streaming", 0.5)]
    theirs = run_kvpress(model, tok, MODEL, got, runs, cells, LENGTH, NEW)
    ours = ruler.run_kvlab(model, tok, MODEL, got, [spec("full"), spec("snapkv"), spec("streaming")], [0.5],
                           ["agnostic"], cells, [], LENGTH, NEW)
    assert len(theirs) == len(ours) == 6
    rows = ruler.agreement(theirs + ours, "kvlab", "kvpress")
    assert {(r["method"], r["ratio"]) for r in rows} == {("full", 0.0), ("snapkv", 0.5), ("streaming", 0.5)}
    assert all(r["same answer"] == r["samples"] == 2 and r["differ"] == 0 for r in rows), rows
    answers = {(c["engine"], c["method"], c["index"]): c["answer"].strip() for c in theirs + ours}
    for method in ("full", "snapkv", "streaming"):
        for i in (0, 1):
            assert answers[("kvlab", method, i)] == answers[("kvpress", method, i)], (method, i)


def test_the_plan_runs_a_router_once_question_aware_whichever_modes():
    specs = [spec("full"), spec("block-route"), spec("snapkv")]
    names = [(s.label, r, m) for s, r, m in ruler.plan(specs, [0.5, 0.75], ["agnostic"])]
    assert names == [("full", 0.0, "agnostic"), ("block-route", 0.5, "aware"), ("block-route", 0.75, "aware"),
                     ("snapkv", 0.5, "agnostic"), ("snapkv", 0.75, "agnostic")]
    both = [(s.label, r, m) for s, r, m in ruler.plan(specs, [0.5], ["aware", "agnostic"])]
    assert both == [("full", 0.0, "aware"), ("full", 0.0, "agnostic"), ("block-route", 0.5, "aware"),
                    ("snapkv", 0.5, "aware"), ("snapkv", 0.5, "agnostic")]


def test_leaderboard_agreement_and_plot_from_cells(tmp_path):
    def cell(engine, method, ratio, mode, task, index, score):
        return {"engine": engine, "method": method, "ratio": ratio, "mode": mode, "task": task, "index": index,
                "score": score, "answer": f"{engine} {score}"}

    cells = [cell("kvlab", "full", 0.0, "aware", t, i, 1.0) for t in ("a", "b") for i in range(2)]
    cells += [cell("kvlab", "snapkv", 0.5, "aware", "a", i, s) for i, s in enumerate([1.0, 0.0])]
    cells += [cell("kvlab", "snapkv", 0.5, "aware", "b", i, 1.0) for i in range(2)]
    cells += [cell("vllm", "snapkv", 0.5, "aware", "a", i, s) for i, s in enumerate([1.0, 1.0])]
    board = ruler.leaderboard(cells, [0.5])
    snap = next(r for r in board if r["engine"] == "kvlab" and r["method"] == "snapkv")
    assert snap["0.5"] == 75.0 and snap["samples"] == 4 and snap["0"] is None  # mean of task means: (50 + 100) / 2
    assert board[0]["method"] == "full" and board[0]["0"] == 100.0 and board[0]["0.5"] is None
    rows = ruler.agreement(cells, "kvlab", "vllm")
    assert rows == [{"method": "snapkv", "ratio": 0.5, "mode": "aware", "samples": 2, "differ": 1, "same answer": 0,
                     "kvlab - vllm": -50.0, "ci95": pytest.approx(98.0), "agree": True}]
    assert ruler.plot(cells, [0.5], tmp_path / "r.png", "t").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["--task", "niah_multivalue"], "downloads Paul Graham essays"),
    (["--ratio", "1.0"], "a compression ratio must be in (0, 1)"),
    (["--ratio", "0.5", "--budget", "0.5"], "give --ratio or --budget, not both"),
    (["--engine", "kvpress", "--method", "block-route"], "'block-route' is not one"),
    (["--engine", "kvpress", "--mode", "aware"], "--mode is the kvlab engine's"),
    (["--engine", "vllm"], "runs in vLLM's environment"),
    (["--engine", "sglang"], "unknown --engine 'sglang'; allowed: kvlab, vllm, kvpress"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--dtype", "int4"], "unknown --dtype 'int4'; allowed: float32"),
    (["--length", "200000"], "--length must be in 1024..131072"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--model", "no-such-model"], "neither a built-in model"),
    (["--method", "snapkv", "-p", "per_head=true"], "--param is the vllm engine's"),
    (["--method", "block-route", "--block-size", "64"], "--block-size is the vllm engine's"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "ruler", "--out", str(out), *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, KVLabError) and message in str(result.exception)
    assert not out.exists()


def test_the_command_tables_a_run_and_resumes(tmp_path, samples, model_dir, monkeypatch):
    from kvlab.experiments.validate import claim_out_dir

    _, path = samples
    out = tmp_path / "out"
    claim_out_dir(out, MODEL, "ruler")
    (out / "samples.json").write_text(path.read_text())  # the same samples: no generation here
    argv = ["eval", "ruler", "--model", MODEL, "--task", "niah_single_1", "--length", str(LENGTH), "--samples", "1",
            "--method", "full", "--method", "streaming", "--budget", "0.5", "--mode", "agnostic",
            "--max-new-tokens", str(NEW), "--out", str(out), "--json"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(r["method"], r["mode"]) for r in data["leaderboard"]] == [("full", "agnostic"), ("streaming", "agnostic")]
    assert (out / "ruler.png").is_file() and json.loads((out / "ruler.json").read_text())["model"] == MODEL
    assert "| kvlab | streaming | agnostic |" in (out / "report.md").read_text()
    assert len(list((out / "cells" / "ruler").glob("*.json"))) == 2
    monkeypatch.setattr(ruler, "prefill", lambda *a, **k: pytest.fail("a cached cell was run again"))
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0 and json.loads(again.stdout)["leaderboard"] == data["leaderboard"]


def test_the_vllm_engine_serves_each_method_with_its_params():
    from kvlab.experiments.ruler_vllm import serve_argv

    argv = serve_argv("m", "block-route", 0.875, 1, 4200, "float32", ["per_head=true"])
    assert argv[argv.index("--ratio") + 1] == "0.875" and argv[argv.index("-p") + 1] == "per_head=true"
    assert "-p" not in serve_argv("m", "full", 0.0, 1, 4200, "float32")
    assert "--block-size" not in argv and "--block-size" not in serve_argv("m", "full", 0.0, 1, 4200, "float32", (), 64)
    paged = serve_argv("m", "block-route", 0.875, 1, 4200, "float32", (), 64)
    assert paged[paged.index("--block-size") + 1] == "64"


@pytest.mark.parametrize("page, label", [(None, "block-route per_head=false"), (32, "block-route per_head=false"),
                                         (128, "block-route per_head=false page=128")])
def test_a_vllm_row_is_named_by_the_command_line_that_reproduces_it(samples, tmp_path, page, label):
    """A page size is in the row's name only where it is not the method's own, so the cells of a run are found
    again by the same command, and rows of other pages stay apart (nothing is served: every cell is cached)."""
    from kvlab.experiments.ruler_vllm import run_vllm

    cells, sample = Cells(tmp_path), samples[0][0]
    key = ruler.cell_key("vllm", "m", sample, label, 0.875, "aware", 4096, ruler.new_tokens(sample, 8))
    cells.put("ruler", key, {**key, "answer": "x", "score": 0.0, "seconds": None})
    found = run_vllm("unused", "m", [sample], [("block-route", 0.875)], cells, 4096, max_new=8,
                     params=["per_head=false"], page_size=page, own_pages={"block-route": 32})
    assert [c["method"] for c in found] == [label]
