"""``kvlab memory`` (the KV-cache size calculator) and ``kvlab calibrate`` (PCA projections for low-rank)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from kvlab.commands.output import print_table
from kvlab.errors import check


def _parse_context(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        check(part != "", f"--context takes token counts separated by commas, got {text!r}")
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        try:
            out.append(int(float(part) * mult))
        except ValueError:
            raise typer.BadParameter(f"not a token count: {part!r}") from None
    return out


def _pair(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None or text.lower() in ("none", "off", "0"):
        return None
    parts = text.replace(":", ",").split(",")
    check(len(parts) == 2, f"{what} takes two numbers A,B, got {text!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise typer.BadParameter(f"{what}: not two integers: {text!r}") from None


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def memory(
        model: Annotated[str, typer.Option("--model", "-m",
                                           help="built-in name, random shape, config.json (or folder) or .gguf")],
        context: Annotated[str, typer.Option(help="context length(s), e.g. 131072 or 8k,32k,128k")] = "131072",
        batch: Annotated[int, typer.Option(help="sequences in the batch")] = 1,
        dtype: Annotated[str, typer.Option(help="cache dtype: bfloat16 | float16 | float32 | fp8")] = "bfloat16",
        gqa: Annotated[int | None, typer.Option(help="GQA: regroup to G KV heads (default: half)")] = None,
        mla: Annotated[str, typer.Option(help="MLA latent width d_c and RoPE key width, 'D_C,D_ROPE' or off")]
        = "512,64",
        share: Annotated[float, typer.Option(help="cross-layer: fraction of layers reusing the layer below")] = 0.5,
        local_global: Annotated[str, typer.Option("--local-global",
                                                  help="local layers per global one and window, 'R,W' or off")]
        = "5,1024",
        bits: Annotated[list[int] | None, typer.Option(help="quantized widths to show (4, 8; repeat)")] = None,
        group: Annotated[int, typer.Option(help="tokens per key scale group when quantized")] = 32,
        ratio: Annotated[float, typer.Option(help="a kvlab eviction method at this ratio (fraction removed)")] = 0.5,
        method: Annotated[str, typer.Option(help="name shown for the eviction method")] = "kvlab method",
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    ) -> None:
        """KV-cache size of a model at a context length, and what each strategy makes of it."""
        from kvlab.experiments.memory_calc import memory_table, model_shape, strategies

        shape = model_shape(model)
        bits = bits if bits is not None else [8, 4]
        for b in bits:
            check(b in (4, 8), f"--bits must be 4 or 8, got {b}")
        check(0 <= share < 1, f"--share must be in [0, 1), got {share}")
        check(0 <= ratio < 1, f"--ratio must be in [0, 1), got {ratio}")
        check(group >= 1, f"--group must be >= 1, got {group}")
        rows = strategies(shape, gqa=gqa, mla=_pair(mla, "--mla"), share=share or None,
                          local_global=_pair(local_global, "--local-global"), bits=bits, group=group,
                          ratio=ratio or None, method=method)
        table = memory_table(shape, _parse_context(context), batch, dtype, rows)
        if as_json:
            print(json.dumps({"model": asdict(shape), "rows": [asdict(r) for r in table]}, indent=2))
            return
        local = f", {shape.local_layers} sliding-window layers" if shape.local_layers else ""
        print_table([{"context": r.context, "strategy": r.strategy, "GiB": f"{r.gib:,.3f}",
                      "KiB/token": f"{r.kib_per_token:,.2f}", "× baseline": f"{r.vs_baseline:.3f}"} for r in table],
                    title=f"KV cache of {shape.name}: {shape.num_layers} layers × {shape.kv_heads} KV heads × "
                          f"head_dim {shape.head_dim}{local}; batch {batch}, {dtype}")

    @app.command()
    def calibrate(
        model: Annotated[str, typer.Option("--model", "-m", help="built-in name, random:<shape> or directory")]
        = "qwen2.5-coder-0.5b",
        rank: Annotated[list[int], typer.Option(help="rank(s) to save (repeat)")] = [32],  # noqa: B006
        tokens: Annotated[int, typer.Option(help="calibration tokens of text")] = 2048,
        text: Annotated[Path | None, typer.Option(help="calibration text file (default: Python stdlib sources)")]
        = None,
        output: Annotated[Path | None, typer.Option(help="folder for the files (default: kvlab's cache)")] = None,
    ) -> None:
        """Fit PCA projections of K (pre- and post-RoPE) and V per layer and KV head (for low-rank pca)."""
        from kvlab.experiments.calibrate import calibrate as run

        paths, stats = run(model, rank, tokens=tokens, text_file=text, folder=output)
        for p in paths:
            typer.echo(f"saved {p}")
        typer.echo(json.dumps(stats, indent=2))
