"""``kvlab bench attention``: the CPU attention benchmark of the routing methods (issue 3)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kvlab.commands.output import print_table


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("attention")
    def attention(
        context: Annotated[list[int] | None, typer.Option(
            "--context", "-c", help="context length in tokens (repeat; default 8192 32768 65536)")] = None,
        budget: Annotated[float, typer.Option(help="fraction of the context read")] = 0.125,
        kv_heads: Annotated[int, typer.Option("--kv-heads", help="KV heads")] = 8,
        q_heads: Annotated[int, typer.Option("--q-heads", help="query heads")] = 32,
        head_dim: Annotated[int, typer.Option("--head-dim", help="head dimension")] = 128,
        repeats: Annotated[int, typer.Option(help="timed runs per path (the best is shown)")] = 7,
        device: Annotated[str, typer.Option(help="cpu (torch paths) or cuda (Triton kernels)")] = "cpu",
        threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    ) -> None:
        """Time one decode step of attention: full vs block-route (bs 16, 64) vs token gather, on the CPU."""
        from kvlab.errors import check
        from kvlab.experiments.bench_attention import DEFAULT_CONTEXTS, bench_attention

        check(repeats >= 1, f"--repeats must be >= 1, got {repeats}")
        if device == "cuda":  # the GPU benchmark of the Triton kernels (one command for both devices)
            from kvlab.commands.kernels import print_gpu_result
            from kvlab.experiments.bench_gpu import run_gpu_benchmark

            gpu = run_gpu_benchmark(tuple(context) if context else None)
            if as_json:
                print(json.dumps(gpu, indent=2, default=str))
            else:
                print_gpu_result(gpu)
            return
        result = bench_attention(tuple(context or DEFAULT_CONTEXTS), budget=budget, kv_heads=kv_heads,
                                 q_heads=q_heads, head_dim=head_dim, repeats=repeats, device=device, threads=threads)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        rows = [{"context": r["context"], "path": r["path"], "part": r["part"], "wall ms": r["ms"],
                 "wall ratio to full": r["ratio_to_full"], "wall speedup": f"{r['speedup']:.2f}x",
                 "cpu ms": r["cpu_ms"], "cpu ratio to full": r["cpu_ratio_to_full"],
                 "cpu speedup": f"{r['cpu_speedup']:.2f}x", "tokens/head": r["tokens_read_per_head"]}
                for r in result["rows"]]
        s = result["setup"]
        print_table(rows, title=(f"kvlab bench attention · {result['machine']} · {result['threads']} threads · "
                                 f"{s['kv_heads']} KV x {s['q_heads']} q heads, d={s['head_dim']}, "
                                 f"budget {s['budget']}, best of {s['repeats']} · load avg {result['load_average']}"))
