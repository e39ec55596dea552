"""``kvlab validate`` and each experiment as its own command: ``kvlab profile locality|entropy``,
``kvlab bench access``, ``kvlab niah``, ``kvlab eval ppl|synthetic`` (and ``ruler``: :mod:`kvlab.commands.ruler`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kvlab.commands import ruler
from kvlab.commands.options import CudaGraphsOpt, JsonOpt, ModelOpt
from kvlab.commands.output import print_table
from kvlab.errors import check

LengthsOpt = Annotated[list[int] | None, typer.Option("--length", "-l", help="context length in tokens (repeat)")]
MethodsOpt = Annotated[list[str] | None, typer.Option("--method", help="method label (repeat; default: all)")]
BudgetsOpt = Annotated[list[float] | None, typer.Option("--budget", help="fraction read or kept (repeat)")]
ContextOpt = Annotated[list[int] | None, typer.Option("--context", "-c", help="context in tokens (repeat)")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="directory for cached cells (resume); none: no cache")]


def _load(model: str):
    import kvlab

    return kvlab.load(model)


def _cells(out: Path | None, model: str):
    from kvlab.experiments.runner import Cells

    if out is not None:
        from kvlab.experiments.validate import claim_out_dir

        claim_out_dir(out, model, "single")
        return Cells(out / "cells")
    return Cells(None)


def _print_notes(notes: list[str]) -> None:
    for n in dict.fromkeys(notes):
        typer.secho(f"note: {n}", fg=typer.colors.YELLOW, err=True)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    profile_app = typer.Typer(no_args_is_help=True, help="Attention profiles of a model (H1 locality, H3 entropy).")
    eval_app = typer.Typer(no_args_is_help=True, help="Quality under compression (perplexity, synthetic tasks, RULER).")
    app.add_typer(profile_app, name="profile")
    app.add_typer(eval_app, name="eval")
    ruler.register(eval_app)

    @app.command()
    def validate(
        model: ModelOpt = "qwen2.5-coder-0.5b",
        quick: Annotated[bool, typer.Option("--quick", help="the ~15-minute run (default)")] = False,
        full: Annotated[bool, typer.Option("--full", help="the full sweep (about 1.5 hours on 2 CPU cores for "
                                                          "qwen2.5-coder-0.5b, 2.5 for qwen2.5-coder-1.5b)")] = False,
        out: Annotated[Path, typer.Option("--out", help="output directory (report.html, results.json, PNGs)")] = Path(
            "kvlab-report"),
        only: Annotated[list[str] | None, typer.Option("--only", help="run only this experiment (repeat): "
                                                          "h1, h3, h2, niah, ppl, synthetic")] = None,
        access_result: Annotated[list[Path] | None, typer.Option(
            "--access-result", help="H2: a `kvlab bench access --json` result from another machine, e.g. a GPU "
                                    "(repeat)")] = None,
        cuda_graphs: CudaGraphsOpt = True,
    ) -> None:
        """Run the validation experiments and write DIR/report.html, DIR/results.json and the plots."""
        from kvlab.experiments.validate import run_validate

        check(not (quick and full), "give --quick or --full, not both")
        res = run_validate(model, out, "full" if full else "quick", only=only, access_results=access_result,
                           cuda_graphs=cuda_graphs)
        rows = [{"experiment": k, "verdict": v.get("verdict", "-"), "seconds": res["timings"].get(k)}
                for k, v in res["experiments"].items()]
        print_table(rows, title=f"kvlab validate · {model} · {res['seconds']:.0f} s")
        _print_notes(res["notes"])
        typer.echo(f"report: {out / 'report.html'}")

    @profile_app.command("locality")
    def profile_locality(model: ModelOpt = "qwen2.5-coder-0.5b", length: LengthsOpt = None,
                         sink: Annotated[int, typer.Option(help="sink tokens (the first block)")] = 16,
                         local: Annotated[int, typer.Option(help="local window in tokens")] = 128,
                         out: OutOpt = None, as_json: JsonOpt = False) -> None:
        """H1: attention mass in the sink, the local window and elsewhere (ε), per layer."""
        from kvlab.experiments import locality

        lengths = sorted(length or [1024, 2048, 4096])
        m, tok = _load(model)
        _check_lengths(m, model, lengths)
        pool = locality.TextPool(m, tok, ["prose", "code"], lengths)
        s = locality.summarize_cells(locality.profile_cells(pool, _cells(out, model), model, sink, local))
        rows = [{"length": r["length"], "layers ε<0.05": f"{r['layers_eps_below']}/{r['n_layers']}",
                 "mean ε": r["mean_eps"], "heads ε<0.05": r["heads_eps_below_fraction"]} for r in s["rows"]]
        print_table(s["rows"] if as_json else rows, title=f"H1 locality · {model} · {s['verdict']}", as_json=as_json)

    @profile_app.command("entropy")
    def profile_entropy(model: ModelOpt = "qwen2.5-coder-0.5b", length: LengthsOpt = None,
                        save: Annotated[bool, typer.Option(help="write the profile block-route auto reads")] = True,
                        out: OutOpt = None, as_json: JsonOpt = False) -> None:
        """H3: normalized attention entropy per layer; saves the dense-layer profile."""
        from kvlab.experiments import entropy, locality

        lengths = sorted(length or [1024, 2048])
        m, tok = _load(model)
        _check_lengths(m, model, lengths)
        pool = locality.TextPool(m, tok, ["prose", "code"], lengths)
        s = entropy.summarize_cells(locality.profile_cells(pool, _cells(out, model), model), model)
        rows = [{"layer": i, "entropy": e, "dense": i in s["dense_layers"]}
                for i, e in enumerate(s["entropy_per_layer"])]
        print_table(rows, title=f"H3 entropy · {model} · boundary {s['boundary']} · stable {s['stable']}",
                    as_json=as_json)
        if save:
            typer.echo(f"profile: {entropy.save_profile(s)}", err=True)

    @bench_app.command("access")
    def bench_access(context: ContextOpt = None, budget: Annotated[float, typer.Option(help="fraction read")] = 0.125,
                     reps: Annotated[int, typer.Option(help="repetitions (best is kept)")] = 7,
                     device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
                     head_dim: Annotated[int, typer.Option(help="head dimension (a K or V row is head_dim × 2 "
                                                                "bytes in bf16)")] = 128,
                     kv_heads: Annotated[int, typer.Option(help="KV heads")] = 8,
                     q_heads: Annotated[int, typer.Option(help="query heads (a multiple of --kv-heads)")] = 32,
                     as_json: JsonOpt = False) -> None:
        """H2: attention time at equal token budget, only contiguity varied (block 1/4/16/64/256, full)."""
        from kvlab.experiments import access

        if device == "cuda":
            import torch

            check(torch.cuda.is_available(), "--device cuda: no CUDA device is available")
        check(device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {device!r}")
        check(16 <= head_dim <= 256, f"--head-dim must be in 16..256, got {head_dim}")
        check(kv_heads >= 1 and q_heads % kv_heads == 0,
              f"--q-heads must be a multiple of --kv-heads, got {q_heads} and {kv_heads}")
        res = access.bench_access(sorted(context or [4096, 16384, 65536]), budget, kv_heads=kv_heads,
                                  q_heads=q_heads, head_dim=head_dim, reps=reps, device=device)
        s = access.summarize_bench(res)
        rows = [{"context": r["context"], "block": r["block"], "ms": 1e3 * r["seconds"], "GB/s": r["gbps"],
                 "× full": r["vs_full"], "path": r["path"]} for r in res["rows"]]
        if as_json:  # the whole result: `kvlab validate --access-result` reads it back
            print(json.dumps(res, indent=2))
            return
        print_table(rows, title=f"bench access · {res['machine']} · copy {res['copy_gbps']:.1f} GB/s · "
                                f"H2 {s['verdict']}")

    @app.command("niah")
    def niah_cmd(model: ModelOpt = "qwen2.5-coder-0.5b", length: LengthsOpt = None, method: MethodsOpt = None,
                 budget: BudgetsOpt = None,
                 depth: Annotated[list[float] | None, typer.Option(help="needle depth in [0, 1] (repeat)")] = None,
                 kind: Annotated[list[str] | None, typer.Option(help="passkey or sentence (repeat)")] = None,
                 out: OutOpt = None, as_json: JsonOpt = False, cuda_graphs: CudaGraphsOpt = True) -> None:
        """Needle in a haystack: accuracy per method, budget, depth and length."""
        from kvlab.experiments import niah
        from kvlab.experiments.runner import resolve

        kinds = kind or ["passkey"]
        for k in kinds:
            check(k in niah.KINDS, f"unknown needle kind {k!r}; allowed: {', '.join(niah.KINDS)}")
        depths = depth or [0.0, 0.5, 1.0]
        check(all(0 <= d <= 1 for d in depths), "--depth must be in [0, 1]")
        budgets = budget or [0.25, 0.125]
        notes: list[str] = []
        specs = resolve(method, notes)
        lengths = sorted(length or [1024, 2048])
        m, tok = _load(model)
        _check_lengths(m, model, lengths, len(depths))
        data = niah.run_cells(m, tok, model, specs, lengths, depths, budgets, kinds, _cells(out, model), notes,
                              cuda_graphs=cuda_graphs)
        s = niah.summarize_cells(data)
        print_table(s["rows"], title=f"NIAH · {model}", as_json=as_json)
        _print_notes(notes)

    @eval_app.command("ppl")
    def eval_ppl(model: ModelOpt = "qwen2.5-coder-0.5b", length: LengthsOpt = None, method: MethodsOpt = None,
                 budget: BudgetsOpt = None, tokens: Annotated[int, typer.Option(help="forced tokens scored")] = 32,
                 out: OutOpt = None, as_json: JsonOpt = False, cuda_graphs: CudaGraphsOpt = True) -> None:
        """Teacher-forced perplexity vs compression, every step through the method."""
        from kvlab.experiments import locality, ppl
        from kvlab.experiments.runner import resolve

        check(tokens >= 2, f"--tokens must be >= 2, got {tokens}")
        notes: list[str] = []
        specs = resolve(method, notes)
        lengths = sorted(length or [2048])
        m, tok = _load(model)
        _check_lengths(m, model, [x + tokens for x in lengths], 2)
        pool = locality.TextPool(m, tok, ["prose", "code"], lengths, extra=tokens + 8)
        data = ppl.run_cells(pool, model, specs, budget or [0.25, 0.125], lengths, tokens, _cells(out, model), notes,
                             cuda_graphs=cuda_graphs)
        print_table(ppl.summarize_cells(data)["rows"], title=f"perplexity · {model}", as_json=as_json)
        _print_notes(notes)

    @eval_app.command("synthetic")
    def eval_synthetic(model: ModelOpt = "qwen2.5-coder-0.5b", method: MethodsOpt = None,
                       ratio: Annotated[list[float] | None, typer.Option(help="compression ratio (repeat)")] = None,
                       length: Annotated[int, typer.Option(help="context tokens per task")] = 512,
                       per_task: Annotated[int, typer.Option(help="instances per task")] = 1,
                       seed: Annotated[int, typer.Option(help="task seed")] = 0,
                       out: OutOpt = None, as_json: JsonOpt = False, cuda_graphs: CudaGraphsOpt = True) -> None:
        """Routing physics: F1, hallucination rate, GER and head consensus per method and ratio."""
        from kvlab.experiments import synthetic
        from kvlab.experiments.runner import resolve

        ratios = ratio or [0.5, 0.9]
        check(all(0 <= r < 1 for r in ratios), "--ratio must be in [0, 1)")
        notes: list[str] = []
        specs = resolve(method, notes)
        m, tok = _load(model)
        _check_lengths(m, model, [length])
        data = synthetic.run_cells(m, tok, model, specs, ratios, length, _cells(out, model), notes, seed, per_task,
                                   cuda_graphs=cuda_graphs)
        s = synthetic.summarize_cells(data)
        cols = ["method", "ratio", "f1", "hallucination", "ger", "consensus"]
        print_table([{c: r[c] for c in cols} for r in s["rows"]] if not as_json else s["rows"],
                    title=f"synthetic · {model} · {s['summary'][:120]}", as_json=as_json)
        _print_notes(notes)


def _check_lengths(model, name: str, lengths: list[int], batch: int = 2) -> None:
    from kvlab.experiments.study import check_context

    for length in lengths:
        check(length > 0, f"--length must be positive, got {length}")
        check_context(model, name, length, batch)
