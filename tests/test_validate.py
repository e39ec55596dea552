"""``kvlab validate``: a whole run on a tiny random model writes a report with every plot embedded; an
interrupted run resumes from its cached cells without prefilling again; bad input gets one clear error."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import kvlab
from kvlab.experiments import access, niah, runner, study, synthetic, validate
from kvlab.experiments.study import Config
from kvlab.experiments.validate import run_validate

TINY = Config(
    profile_lengths=[128, 256], kinds=["prose", "code"], access_contexts=[2048], access_reps=1, e2e_budget=0.25,
    e2e_steps=2, niah_lengths=[384], niah_depths=[0.5], niah_kinds=["passkey"], niah_budgets=[0.25],
    ppl_lengths=[256], ppl_tokens=4, ppl_budgets=[0.25], synthetic_length=1200, synthetic_ratios=[0.5],
    synthetic_per_task=1, methods=[m for m in ("full", "block-route", "snapkv") if m in kvlab.METHODS],
    other_model_lengths=[],
)


@pytest.fixture(scope="module")
def tiny():
    return kvlab.load("random:tiny-llama")


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("validate") / "out"
    old = os.environ.get("KVLAB_CACHE")
    os.environ["KVLAB_CACHE"] = str(out.parent / "cache")
    try:
        model, tok = tiny
        res = run_validate("random:tiny-llama", out, "quick", config=TINY, model=model, tokenizer=tok)
    finally:
        if old is None:
            os.environ.pop("KVLAB_CACHE", None)
        else:
            os.environ["KVLAB_CACHE"] = old
    return out, res


def test_report_complete(first_run):
    out, res = first_run
    assert set(res["experiments"]) == set(validate.EXPERIMENTS)
    for name, sec in res["experiments"].items():
        assert sec["verdict"] in ("supported", "not supported", "inconclusive"), name
        assert sec["text"] and sec["measurement"]
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 8
    assert html.count("data:image/png;base64,") == len(pngs)
    for title, _ in validate.report.CLAIMS.values():
        assert title.split("·")[-1].strip() in html
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == "random:tiny-llama" and data["conclusion"]
    md = (out / "summary.md").read_text()
    for name, sec in res["experiments"].items():
        assert f"| {name} | **{sec['verdict']}** |" in md
    assert "cpu" in data["machine"].lower() or "threads" in data["machine"]


def test_resume_uses_cached_cells(first_run, tiny, monkeypatch):
    out, _ = first_run

    def boom(*args, **kwargs):
        raise AssertionError("prefilled again although every cell was cached")

    for module in (runner, niah, synthetic):
        monkeypatch.setattr(module, "prefill", boom)
    model, tok = tiny
    res = run_validate("random:tiny-llama", out, "quick", config=TINY, model=model, tokenizer=tok)
    assert set(res["experiments"]) == set(validate.EXPERIMENTS)


def test_refuses_other_models_out_dir(first_run, tiny):
    out, _ = first_run
    model, tok = tiny
    with pytest.raises(kvlab.KVLabError, match="holds results of model 'random:tiny-llama'"):
        run_validate("random:tiny-qwen2", out, "quick", config=TINY, model=model, tokenizer=tok)


def test_bad_input(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    with pytest.raises(kvlab.KVLabError, match="unknown experiment bogus"):
        run_validate("random:tiny-llama", tmp_path / "a", "quick", only=["bogus"], config=TINY, model=model,
                     tokenizer=tok)
    with pytest.raises(kvlab.KVLabError, match="unknown mode"):
        run_validate("random:tiny-llama", tmp_path / "a", "medium", model=model, tokenizer=tok)
    too_long = Config(**{**TINY.__dict__, "profile_lengths": [8192]})
    with pytest.raises(kvlab.KVLabError, match="exceeds random:tiny-llama's limit of 4096"):
        run_validate("random:tiny-llama", tmp_path / "b", "quick", config=too_long, model=model, tokenizer=tok)
    monkeypatch.setattr(study, "available_memory", lambda: 64 << 20)
    with pytest.raises(kvlab.KVLabError, match=r"needs about .* GiB .* only 0\.1 GiB is available"):
        run_validate("random:tiny-llama", tmp_path / "c", "quick", config=TINY, model=model, tokenizer=tok)


def test_memory_estimate_grows_with_context(tiny):
    model, _ = tiny
    a, b = study.estimate_memory(model, 1024), study.estimate_memory(model, 4096)
    assert b > a > sum(p.numel() * 4 for p in model.parameters())


def test_cli_errors_are_one_line():
    from kvlab.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["validate", "--model", "random:tiny-llama", "--only", "bogus", "--out", "/tmp/x"])
    assert isinstance(result.exception, kvlab.KVLabError)
    assert "unknown experiment bogus" in str(result.exception)
    result = runner.invoke(app, ["validate", "--quick", "--full"])
    assert isinstance(result.exception, kvlab.KVLabError)
    result = runner.invoke(app, ["niah", "--model", "random:tiny-llama", "--kind", "haystack"])
    assert "unknown needle kind" in str(result.exception)


def test_cli_commands_small(tmp_path):
    from kvlab.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["bench", "access", "--context", "2048", "--reps", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][0]["context"] == 2048
    r = runner.invoke(app, ["profile", "locality", "--model", "random:tiny-llama", "--length", "128", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "synthetic", "--model", "random:tiny-llama", "--method", "full", "--length", "1200",
                            "--ratio", "0.5", "--json"])
    assert r.exit_code == 0, r.output


def test_h2_gpu_result_decides_the_verdict_and_bad_files_are_refused(tmp_path):
    def bench(device: str, scattered: float) -> dict:
        rows = []
        for c in (4096, 8192):
            rows.append({"context": c, "block": "full", "seconds": 1.0})
            rows.append({"context": c, "block": 1, "seconds": scattered})
            rows += [{"context": c, "block": b, "seconds": 0.1} for b in (4, 16, 64, 256)]
        return {"device": device, "machine": device.upper(), "budget": 0.125, "kv_heads": 8, "q_heads": 32,
                "head_dim": 128, "copy_gbps": 10.0, "rows": rows}

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(bench("cuda", 0.102)))
    gpu = access.load_access_result(path)
    e2e = {"rows": [], "context": 4096, "batch": 2, "budget": 0.125}
    cpu = access.summarize({"bench": [bench("cpu", 0.2)], "e2e": e2e}, validate.QUICK)
    assert cpu["verdict"] == "supported"  # 2× slower scattered
    both = access.summarize({"bench": [bench("cpu", 0.2), gpu], "e2e": e2e}, validate.QUICK)
    assert both["verdict"] == "not supported"  # the GPU's 1.02× decides
    assert "CPU: supported" in both["text"] and "CUDA: not supported" in both["text"]
    with pytest.raises(kvlab.KVLabError, match="no such file"):
        access.load_access_result(tmp_path / "missing.json")
    (tmp_path / "rows.json").write_text(json.dumps(bench("cuda", 0.1)["rows"]))
    with pytest.raises(kvlab.KVLabError, match="not a `kvlab bench access --json` result"):
        access.load_access_result(tmp_path / "rows.json")


def test_a_model_sized_run_in_parts_with_a_second_model_resumes(tiny, tmp_path, monkeypatch):
    """The orchestration the 1.5B run uses: its own section order, the synthetic set in parts with focused
    families, perplexity continuing the profile texts, H3 and consensus on a second model (here the same
    tiny shape), progress.json after each section; a second invocation prefills nothing."""
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    methods = [m for m in ("full", "block-route", "snapkv") if m in kvlab.METHODS]
    cfg = Config(**{**TINY.__dict__, "order": ["synthetic", "h3", "h1", "ppl"], "synthetic_focus": {"instance/s2a": 2},
                    "synthetic_batch": 6, "synthetic_methods": methods, "ppl_methods": methods,
                    "ppl_from_profile": True, "pool_per_kind": True, "profile_stages": [[128], [256]],
                    "other_model_lengths": [128], "h3_models": ["random:tiny-llama-b"],
                    "consensus_model": "random:tiny-llama", "consensus_methods": ["block-route"],
                    "consensus_ratios": [0.5]})
    model, tok = tiny
    out = tmp_path / "out"
    only = ["synthetic", "h3", "h1", "ppl"]
    res = run_validate("random:tiny-llama", out, "full", only=only, config=cfg, model=model, tokenizer=tok)
    assert list(res["experiments"]) == ["synthetic", "h3", "h1", "ppl"]  # the config's order
    sy = res["experiments"]["synthetic"]
    n = len(synthetic.generate(tok, 0, 1200, 1, focus={"instance/s2a": 2}))
    assert n == 15 and all(r["n"] == n for r in sy["summary"]["rows"])  # 3 parts of ≤ 6, merged
    assert sy["consensus_compare"]["questions"] == 14  # the base set: the questions both models were asked
    assert any("H3 on random:tiny-llama-b skipped" in x for x in res["notes"])  # unknown shape: noted, not fatal
    profile = res["prefill_seconds"]["profile"]  # 2 stages × 2 texts, each its own prefill
    assert len(profile) == 4 and all(s is None for s in profile[:2])  # the 128 stage freed its prefill
    assert res["prefill_seconds"]["ppl"] == profile[2:]  # perplexity continues the texts of the 256-token stage
    h1 = res["experiments"]["h1"]["summary"]
    assert [r["length"] for r in h1["rows"]] == [128, 256] and set(h1["by_kind"]) == {"prose", "code"}
    md = (out / "summary.md").read_text()
    assert "## H1: ε per text kind" in md and "## Routing physics" in md and "shared questions" in md
    progress = json.loads((out / "progress.json").read_text())
    assert set(progress["done"]) == set(only) and progress["cpu_timings"]["synthetic"] > 0

    def boom(*args, **kwargs):
        raise AssertionError("prefilled again although every cell was cached")

    for module in (runner, synthetic):
        monkeypatch.setattr(module, "prefill", boom)
    again = run_validate("random:tiny-llama", out, "full", only=only, config=cfg, model=model, tokenizer=tok)
    assert again["experiments"]["synthetic"]["summary"]["rows"] == sy["summary"]["rows"]


def test_the_table_claims_every_config_field():
    """Every field of Config is read by every experiment (SHARED) or named by the one experiment that reads it."""
    claimed = [f for e in validate.EXPERIMENTS.values() for f in e.config] + list(validate.SHARED)
    assert sorted(claimed) == sorted(f.name for f in dataclasses.fields(Config))
    for name, experiment in validate.EXPERIMENTS.items():
        module = experiment.run.__module__
        assert experiment.summarize.__module__ == module and module.startswith("kvlab.experiments."), name


def test_no_cuda_graphs_reaches_decode(tiny, tmp_path, monkeypatch):
    """``--no-cuda-graphs`` on the commands that decode is decode's ``cuda_graphs=False`` (on the CPU nothing
    else changes); validate passes it to every experiment through the study."""
    from kvlab.cli import app
    from kvlab.experiments import runner

    seen: list[bool] = []
    real = runner.decode
    monkeypatch.setattr(runner, "decode", lambda *a, **k: seen.append(k["cuda_graphs"]) or real(*a, **k))
    cli = CliRunner()
    commands = [["eval", "synthetic", "--method", "full", "--length", "1200", "--ratio", "0.5"],
                ["niah", "--method", "full", "--length", "400", "--depth", "0.5"],
                ["eval", "ppl", "--method", "full", "--length", "128", "--tokens", "4"]]
    for args in commands:
        for flag, expected in (([], True), (["--no-cuda-graphs"], False)):
            seen.clear()
            r = cli.invoke(app, [*args, "--model", "random:tiny-llama", "--json", *flag])
            assert r.exit_code == 0, r.output
            assert seen and all(x is expected for x in seen), (args, flag, seen)
    passed = {}
    monkeypatch.setattr(validate, "run_validate", lambda *a, **k: passed.update(k) or {"timings": {}, "experiments": {},
                                                                                      "seconds": 0, "notes": []})
    assert cli.invoke(app, ["validate", "--model", "random:tiny-llama", "--no-cuda-graphs", "--out",
                            str(tmp_path / "v")]).exit_code == 0
    assert passed["cuda_graphs"] is False
    monkeypatch.undo()
    monkeypatch.setattr(runner, "decode", lambda *a, **k: seen.append(k["cuda_graphs"]) or real(*a, **k))
    seen.clear()
    model, tok = tiny
    run_validate("random:tiny-llama", tmp_path / "w", "quick", only=["ppl", "niah"], config=TINY, model=model,
                 tokenizer=tok, cuda_graphs=False)
    assert seen and not any(seen)
