"""``kvlab eval ruler``: RULER's offline tasks (lm-eval's samples and scoring) in kvlab's engine, in vLLM through
``kvlab serve`` and lm-eval's client, or in kvpress's pipeline; the leaderboard of every engine in ``--out``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from kvlab.commands.options import JsonOpt, ModelOpt
from kvlab.commands.output import print_table
from kvlab.commands.serve import DTYPES
from kvlab.errors import check

LEADERBOARD = ("full", "streaming", "snapkv", "pyramidkv", "ada-snapkv", "knorm", "tova", "kv-compress",
               "block-route", "cluster-route")


def ratios_of(ratio: list[float] | None, budget: list[float] | None) -> list[float]:
    """``--ratio`` (fraction removed) or ``--budget`` (fraction kept), never both; default: kvpress's four."""
    from kvlab.experiments.ruler import RATIOS

    check(not (ratio and budget), "give --ratio or --budget, not both")
    out = list(ratio) if ratio else [round(1.0 - b, 6) for b in budget] if budget else list(RATIOS)
    for r in out:
        check(0 < r < 1, f"a compression ratio must be in (0, 1) (a budget in (0, 1)), got {r:g}")
    return sorted(set(out))


def engine_methods(engine: str, methods: list[str] | None) -> list[str]:
    """The methods an engine runs: ``--method`` checked against what it can run, or its leaderboard set."""
    from kvlab.methods import METHODS

    for m in methods or []:
        check(m in METHODS, f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    if engine == "vllm":
        from importlib.util import find_spec

        check(find_spec("vllm") is not None, "--engine vllm runs in vLLM's environment: .venv-vllm/bin/kvlab eval "
                                             "ruler ... (make test builds it)")
        from kvlab.commands.serve import vllm_methods

        return vllm_methods(methods, LEADERBOARD)
    if engine == "kvpress":
        from kvlab.experiments.ruler_kvpress import check_methods, presses

        check_methods(methods or [])
        return list(methods) if methods else ["full", *presses()]
    return list(methods) if methods else list(LEADERBOARD)


def register(eval_app: typer.Typer) -> None:
    @eval_app.command("ruler")
    def eval_ruler(
        model: ModelOpt = "qwen2.5-coder-0.5b",
        engine: Annotated[str, typer.Option(help="kvlab (its own engine), vllm (kvlab serve + lm-eval's client; "
                                                 "run from .venv-vllm) or kvpress (kvpress's pipeline)")] = "kvlab",
        task: Annotated[list[str] | None, typer.Option(help="RULER task (repeat; default: the six that build "
                                                            "offline)")] = None,
        length: Annotated[int, typer.Option(help="prompt length in tokens")] = 4096,
        samples: Annotated[int, typer.Option(help="samples per task")] = 6,
        method: Annotated[list[str] | None, typer.Option(help="method (repeat; default: the engine's leaderboard "
                                                              "set)")] = None,
        ratio: Annotated[list[float] | None, typer.Option(help="fraction removed (repeat; default 0.25 0.5 0.75 "
                                                               "0.875)")] = None,
        budget: Annotated[list[float] | None, typer.Option(help="fraction kept (repeat; instead of --ratio)")] = None,
        mode: Annotated[list[str] | None, typer.Option(help="kvlab engine: aware (question inside the compressed "
                                                            "prompt) and/or agnostic (question after); default "
                                                            "both")] = None,
        max_new_tokens: Annotated[int | None, typer.Option(
            "--max-new-tokens", help="cap on the answer's tokens (default: each task's own max_gen_toks)")] = None,
        dtype: Annotated[str, typer.Option(help="vllm engine: the server's dtype (kvlab's engine runs float32)")] =
            "float32",
        param: Annotated[list[str] | None, typer.Option(
            "--param", "-p", help="vllm engine: NAME=VALUE given to every method's server (kvlab serve -p; the "
                                  "method's row is named with it)")] = None,
        block_size: Annotated[int | None, typer.Option(
            "--block-size", help="vllm engine: the methods' page size in tokens (kvlab serve --block-size; default "
                                 "each method's own; rows named page=N when not the method's; full runs on "
                                 "128)")] = None,
        out: Annotated[Path, typer.Option(help="directory: samples, one file per cell (resume), ruler.json, "
                                               "report.md, ruler.png; every engine's cells in it are tabled")] = Path(
            "kvlab-ruler"),
        as_json: JsonOpt = False,
    ) -> None:
        """RULER (lm-eval's tasks and scoring): score per method and compression ratio, full cache on top."""
        from kvlab.experiments import ruler
        from kvlab.experiments.runner import Cells
        from kvlab.experiments.validate import claim_out_dir

        check(engine in ruler.ENGINES, f"unknown --engine {engine!r}; allowed: {', '.join(ruler.ENGINES)}")
        tasks = ruler.check_tasks(task or list(ruler.TASKS))
        check(samples >= 1, f"--samples must be at least 1, got {samples}")
        check(1024 <= length <= 131072, f"--length must be in 1024..131072 (RULER's lengths), got {length}")
        check(max_new_tokens is None or max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        check(dtype in DTYPES, f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")  # kvlab serve's
        check(engine == "vllm" or not param, "--param is the vllm engine's (the kvlab engine takes a preset name as "
                                             "--method)")
        check(engine == "vllm" or block_size is None, "--block-size is the vllm engine's (vLLM's page size)")
        ratios = ratios_of(ratio, budget)
        modes = list(dict.fromkeys(mode or ruler.MODES))
        for m in modes:
            check(m in ruler.MODES, f"unknown --mode {m!r}; allowed: {', '.join(ruler.MODES)}")
        check(engine == "kvlab" or mode is None, "--mode is the kvlab engine's: vllm answers question-aware, kvpress "
                                                 "question-agnostic")
        methods = engine_methods(engine, method)
        if param or block_size is not None:
            from kvlab.commands.serve import kvlab_section, page_size_for

            for m in (m for m in methods if m != "full"):  # one line: a parameter or page a method does not take
                kvlab_section(m, param, None, 0.5, None, page_size_for(m, block_size))
        directory, served_name = _model_dir(model)
        _check_length(directory, model, length)
        claim_out_dir(out, served_name, "ruler")
        cells = Cells(out / "cells")
        t0 = time.perf_counter()
        data = ruler.load_samples(out / "samples.json", str(directory), tasks, length, samples)
        notes: list[str] = []
        runs = [(m, 0.0) if m == "full" else (m, r) for m in methods for r in ([0.0] if m == "full" else ratios)]
        if engine == "vllm":
            from kvlab.commands.serve import page_size_for
            from kvlab.experiments.ruler_vllm import run_vllm

            run_vllm(str(directory), served_name, data, runs, cells, length, max_new_tokens, dtype, log_dir=out,
                     params=param or [], page_size=block_size, own_pages={m: page_size_for(m, None) for m in methods})
        else:
            import kvlab

            m, tok = kvlab.load(str(directory))
            if engine == "kvpress":
                from kvlab.experiments.ruler_kvpress import run_kvpress

                run_kvpress(m, tok, served_name, data, runs, cells, length, max_new_tokens)
            else:
                from kvlab.experiments.runner import resolve

                specs = resolve(methods, notes)
                ruler.run_kvlab(m, tok, served_name, data, specs, ratios, modes, cells, notes, length,
                                max_new_tokens)
        _report(out, ratios, served_name, length, time.perf_counter() - t0, as_json)
        for n in dict.fromkeys(notes):
            typer.secho(f"note: {n}", fg=typer.colors.YELLOW, err=True)


def _model_dir(model: str) -> tuple[Path, str]:
    """The model's directory (its tokenizer sizes the samples) and its name, as ``kvlab serve`` resolves them."""
    from kvlab.commands.serve import resolve_model

    return resolve_model(model)


def _check_length(directory: Path, model: str, length: int) -> None:
    from kvlab.commands.serve import model_facts

    limit = model_facts(directory)["max_len"]
    check(limit is None or length + 256 <= limit,
          f"--length {length} (+ the answer) exceeds {model}'s limit of {limit} tokens")


def _report(out: Path, ratios: list[float], model: str, length: int, seconds: float, as_json: bool) -> None:
    from kvlab.experiments import ruler
    from kvlab.experiments.runner import Cells
    from kvlab.io import write_atomic
    from kvlab.machine import describe

    cells = [c for c in Cells(out / "cells").all("ruler") if c["model"] == model and c["length"] == length]
    ratios = sorted({c["ratio"] for c in cells if c["ratio"] > 0} | set(ratios))  # every run's, not just this one's
    board = ruler.leaderboard(cells, ratios)
    pairs = [(a, b) for a, b in (("kvlab", "vllm"), ("kvlab", "kvpress"))
             if any(c["engine"] == a for c in cells) and any(c["engine"] == b for c in cells)]
    agree = {f"{a} vs {b}": ruler.agreement(cells, a, b) for a, b in pairs}  # paired by mode too
    result = {"model": model, "length": length, "machine": describe(), "seconds": seconds, "leaderboard": board,
              "per_task": ruler.per_task(cells), "agreement": agree}
    write_atomic(out / "ruler.json", json.dumps(result, indent=2))
    if cells:
        ruler.plot(cells, ratios, out / "ruler.png", f"RULER {length} · {model}")
    write_atomic(out / "report.md", ruler.markdown(result, ratios, "ruler.png" if cells else None))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print_table(board, title=f"RULER {length} · {model} · score ×100, mean of tasks · {seconds:.0f} s")
    for name, rows in agree.items():
        if rows:
            print_table(rows, title=f"agreement {name} (paired, same samples)")
    typer.echo(f"results: {out / 'ruler.json'}, {out / 'report.md'}" + (f", {out / 'ruler.png'}" if cells else ""),
               err=True)
