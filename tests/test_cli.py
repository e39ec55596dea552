"""The CLI on a tiny random model: generate (table and JSON), methods, models."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from kvlab.cli import app

runner = CliRunner()


def test_generate_json_reports_kept_tokens_and_cache_bytes():
    result = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--method", "streaming",
                                 "--budget", "0.5", "--prompt", "x" * 80, "--max-new-tokens", "4",
                                 "--block-size", "8", "-p", "n_sink=2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    stats = data["stats"]
    assert stats["method"] == "streaming" and stats["n_sink"] == 2
    assert {n for layer in stats["kept_tokens_per_layer_head"] for b in layer for n in b} == {40}
    assert stats["cache_mb_after_prefill"] < stats["cache_mb_full"]
    assert stats["new_tokens"] == 4 and len(data["texts"]) == 1


def test_methods_and_models_list():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    names = {row["method"] for row in json.loads(result.output)}
    assert {"full", "streaming"} <= names
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    models = {row["model"] for row in json.loads(result.output)}
    assert {"qwen2.5-coder-0.5b", "gemma3-270m", "random:tiny-llama", "random:llama-3.1-8b"} <= models


def test_methods_are_listed_by_family():
    from kvlab.methods import FAMILIES, METHODS

    rows = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    assert all(r["family"] == METHODS[r["method"]].family for r in rows)
    order = [FAMILIES.index(r["family"]) for r in rows]
    assert order == sorted(order) and set(order) == set(range(len(FAMILIES)))  # grouped, every family there
    family = {r["method"]: r["family"] for r in rows}
    assert (family["full"], family["block-route"], family["tova"], family["quantize"], family["cross-layer"]) == (
        "reference", "routing", "eviction", "smaller vectors", "architectural")


def test_methods_say_what_runs_inside_vllm():
    rows = {r["method"]: r["in vLLM"] for r in json.loads(runner.invoke(app, ["methods", "--json"]).output)}
    assert (rows["full"], rows["block-route"]) == ("inert", "routes")
    assert all(rows[m] == "evicts" for m in ("streaming", "kv-compress", "snapkv", "pyramidkv", "tova", "h2o", "knorm"))
    assert rows["ada-snapkv"].startswith("no: its per-head budgets") and rows["low-rank"].startswith("no: ")
    assert all(v.startswith("no: ") for m, v in rows.items() if m in ("cluster-route", "quantize", "cross-layer"))


def test_piped_tables_print_every_name_whole():
    """`kvlab models | grep qwen2.5-coder-0.5b` must find the name: no identifier wraps when piped."""
    import re
    import subprocess
    import sys

    from kvlab.methods import METHODS
    from kvlab.models import BUILTIN_MODELS, RANDOM_SHAPES

    expected = {
        "models": list(BUILTIN_MODELS) + [f"random:{s}" for s in RANDOM_SHAPES],
        "methods": list(METHODS),
    }
    for command, names in expected.items():
        out = subprocess.run([sys.executable, "-m", "kvlab", command], capture_output=True, text=True, check=True,
                             timeout=120).stdout
        cells = {c.strip() for line in out.splitlines() for c in re.split(r"[│┃]", line)}
        missing = [n for n in names if n not in cells]
        assert not missing, f"`kvlab {command}` piped lost {missing}:\n{out}"
        widths = {len(line) for line in out.splitlines() if "│" in line}
        assert len(widths) == 1, "every table row has the same width (nothing wrapped onto extra lines)"


def test_a_benchmarks_result_is_written_whole_then_printed_as_json_or_a_table(tmp_path, capsys):
    from kvlab.commands.output import emit_result

    result = {"machine": "here", "rows": [{"method": "full", "tok/s": 3.3}]}
    out = tmp_path / "r.json"
    emit_result(result, result["rows"], "bench", out, as_json=True)
    assert json.loads(out.read_text()) == result and json.loads(capsys.readouterr().out) == result
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left
    emit_result(result, result["rows"], "bench")
    printed = capsys.readouterr().out
    assert "bench" in printed and "full" in printed and "3.3" in printed
