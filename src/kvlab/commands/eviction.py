"""``kvlab bench throughput``: decode speed and cache size under eviction."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kvlab.commands.options import CudaGraphsOpt, JsonOpt, ModelOpt
from kvlab.commands.output import print_table
from kvlab.errors import KVLabError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise KVLabError(f"--ratios takes comma-separated numbers in [0, 1), got {text!r}") from None


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command()
    def throughput(
        model: ModelOpt = "qwen2.5-coder-0.5b",
        batch: Annotated[int, typer.Option(help="sequences decoded together")] = 8,
        context: Annotated[int, typer.Option(help="prompt tokens per sequence")] = 4096,
        new_tokens: Annotated[int, typer.Option(help="tokens decoded per configuration")] = 32,
        ratios: Annotated[str, typer.Option(help="compression ratios, comma-separated")] = "0,0.5,0.75,0.875,0.9375",
        methods: Annotated[str, typer.Option(help="eviction methods, comma-separated")] = "kv-compress,snapkv",
        block_size: Annotated[int, typer.Option(help="tokens per block of the store")] = 16,
        rounds: Annotated[int, typer.Option(help="decode every config this many times, report the fastest")] = 1,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
        cuda_graphs: CudaGraphsOpt = True,
        dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
        markdown: Annotated[bool, typer.Option("--markdown", help="print a Markdown table")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Decode tokens/s and cache MB on this machine, per method and compression ratio (prefill once)."""
        from kvlab.experiments import bench_throughput as bt

        cfg = bt.ThroughputConfig(model=model, batch=batch, context=context, new_tokens=new_tokens,
                                  ratios=_floats(ratios), block_size=block_size, dtype=dtype, rounds=rounds,
                                  threads=threads, cuda_graphs=cuda_graphs,
                                  methods=tuple(m.strip() for m in methods.split(",") if m.strip()))
        result = bt.run(cfg)
        if as_json:
            print(json.dumps(result, indent=2))
        elif markdown:
            print(bt.markdown(result))
        else:
            m = result["machine"]
            print_table(result["rows"], title=f"decode throughput · {model} · batch {batch} × {context} tokens · "
                                              f"{m['cpu']} ({m['torch_threads']} threads)")
