"""``kvlab bench gpu``: the GPU benchmark of kvlab's Triton kernels (needs CUDA; one error line without)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kvlab.commands.output import print_table


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """``"8k,32k,128k"`` -> ``(8192, 32768, 131072)``."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            out.append(int(float(part.rstrip("k")) * mult))
        except ValueError:
            raise typer.BadParameter(f"{what}: not a number: {part!r}") from None
    return tuple(out)


def print_gpu_result(result: dict[str, Any]) -> None:
    """The tables of a :func:`kvlab.experiments.bench_gpu.run_gpu_benchmark` result."""
    from kvlab.experiments.gpu_report import table_rows

    rates = result["device_rates"]
    print_table(table_rows(result), title=f"decode attention · {result['device']} · bf16, 8 KV × 32 q heads, D 128 · "
                                          f"copy {rates['copy_GBps']:.0f} GB/s, matmul {rates['matmul_TFLOPs']:.0f} "
                                          "TFLOP/s")
    if result["targets"]:
        print_table(result["targets"], title="targets (ratios from this run)")
    if result["e2e"]:
        print_table([{"context × batch": f"{r['context'] // 1024}K × {r['batch']}", "variant": r["variant"],
                      "tok/s": r.get("tokens_per_s"), "ms/step": r.get("ms_per_step"),
                      "roofline ms": r.get("roofline_ms"), "× roofline": r.get("of_roofline"),
                      "note": r.get("error", "")}
                     for r in result["e2e"]], title="end to end · random-weight llama-3.1-8b, bf16, kvlab decode "
                                                    "(CUDA graphs) · roofline: weights + KV read ÷ copy bandwidth")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("gpu")
    def bench_gpu(
        context: Annotated[str | None, typer.Option(help="contexts, e.g. 8k,32k,128k (default 8k..128k)")] = None,
        batch: Annotated[str | None, typer.Option(help="batch sizes, e.g. 1,4,16 (default)")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="8K and 32K, batch 1 and 4, end to end at 32K")] = False,
        e2e: Annotated[bool, typer.Option("--e2e/--no-e2e", help="also time decode of llama-3.1-8b end to end")]
        = True,
        attention: Annotated[bool, typer.Option("--attention/--no-attention",
                                                help="the decode-attention kernel table (off: end to end only)")]
        = True,
        cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs",
                                                  help="end to end with CUDA graphs (default) or eager steps")] = True,
        tune: Annotated[bool, typer.Option("--tune/--no-tune", help="first pick the paged kernel's launch config")]
        = True,
        warmup: Annotated[int, typer.Option(help="untimed calls before timing")] = 10,
        iters: Annotated[int, typer.Option(help="timed calls (median reported)")] = 50,
        out_dir: Annotated[Path, typer.Option("--out-dir", help="where <device>.json goes")] = Path(
            "benchmarks/results"),
        docs: Annotated[bool, typer.Option("--docs/--no-docs",
                                           help="write the tables into ./docs/benchmarks.md if present")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    ) -> None:
        """Time kvlab's Triton decode kernels against torch SDPA / flash-attn / FlashInfer on a CUDA GPU."""
        from kvlab.errors import check
        from kvlab.experiments.bench_gpu import run_gpu_benchmark
        from kvlab.experiments.gpu_report import update_docs

        check(warmup >= 0 and iters >= 1, "--warmup must be >= 0 and --iters >= 1")
        result = run_gpu_benchmark(_ints(context, "--context"), _ints(batch, "--batch"), quick=quick, e2e=e2e,
                                   tune=tune, attention=attention, cuda_graphs=cuda_graphs, warmup=warmup,
                                   iters=iters, out_dir=out_dir, log=lambda line: typer.echo(line, err=True))
        if docs and Path("docs/benchmarks.md").is_file():  # run from a kvlab checkout
            typer.echo(f"updated {update_docs(result)} (section \"## GPU kernels\")", err=True)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        print_gpu_result(result)
