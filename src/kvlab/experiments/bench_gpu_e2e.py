"""End to end in ``kvlab bench gpu``: decode tokens/s of a random-weight model (``llama-3.1-8b`` in bf16)
through :func:`kvlab.generation.decode` with CUDA graphs, ``full`` and ``block-route`` at 1/8, beside the
roofline (bytes of weights + KV read per step ÷ the measured copy bandwidth) and transformers' own
``StaticCache`` + SDPA decode step replayed from a CUDA graph. Runs on the CPU too (no peer, no claims):
the tests time a tiny model."""

from __future__ import annotations

import time
from typing import Any

import torch

from kvlab.experiments.gpu_timing import Log

E2E_CONFIGS = ((32768, 1), (131072, 1), (131072, 4))  # (context, batch); batch halves until it fits
E2E_BUDGET = 1 / 8


def _filled_snapshot(model: Any, context: int, batch: int, reserve: int, device: torch.device) -> Any:
    """A snapshot on the GPU whose store holds ``context`` random tokens per row (decode speed does not
    depend on the values), without a prefill: a 128K prefill of an 8B model is not what is measured."""
    from kvlab.generation import Snapshot
    from kvlab.models.shaping import new_store

    cfg = model.config
    store = new_store(cfg, batch, 16, torch.bfloat16, device)
    for layer in store.layers:
        layer.reserve(context + reserve)
        layer.keys.normal_()
        layer.values.normal_()
        pos = layer.positions.view(layer.rows, -1)
        pos[:, :context] = torch.arange(context, device=device)
        layer.lengths = torch.full((layer.rows,), context, dtype=torch.long, device=device)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Snapshot(store=store, queries={}, logits=torch.zeros(batch, cfg.vocab_size, device=device),
                    context_lengths=torch.full((batch,), context, dtype=torch.long), scaling=head_dim**-0.5,
                    num_query_heads=cfg.num_attention_heads, prefill_seconds=0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kvlab_step_seconds(model: Any, method: Any, context: int, batch: int, steps: int, device: torch.device,
                       cuda_graphs: bool = True, warm: int = 8) -> tuple[float, dict[str, Any]]:
    """Seconds per decode step of ``method`` through :func:`kvlab.generation.decode`, steady state: two
    decodes of ``warm`` and ``warm + steps`` tokens on one filled store, the difference of their times
    divided by ``steps`` (what both share -- the method's prefill work, the eager first step, the
    capture of the CUDA graphs -- cancels), after an untimed decode that compiles the kernels."""
    from kvlab.generation import decode

    snapshot = _filled_snapshot(model, context, batch, 2 * warm + steps + 24, device)
    decode(model, snapshot, method, max_new_tokens=4, copy_store=False, cuda_graphs=cuda_graphs)  # kernels built
    times, info = [], {}
    for n in (warm, warm + steps):
        result = decode(model, snapshot, method, max_new_tokens=n, copy_store=False, cuda_graphs=cuda_graphs)
        times.append(result.decode_seconds)
        info = {"graphs": result.graphs, "replays": result.replays}
    return (times[1] - times[0]) / steps, info


def hf_static_step_seconds(model: Any, context: int, batch: int, steps: int, device: torch.device) -> float:
    """Seconds per decode step of transformers' own ``StaticCache`` + SDPA, the step replayed from a CUDA
    graph (cache filled with random K/V, ``context`` tokens in use)."""
    from transformers.cache_utils import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=context + steps + 16)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    probe = torch.zeros(batch, cfg.num_key_value_heads, 1, head_dim, dtype=torch.bfloat16, device=device)
    for layer in cache.layers:
        layer.lazy_initialization(probe, probe)
        layer.keys.normal_()
        layer.values.normal_()
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.full((batch, 1), context, dtype=torch.long, device=device)
    cache_position = torch.full((1,), context, dtype=torch.long, device=device)

    def step() -> None:
        logits = model(input_ids=token, position_ids=position, cache_position=cache_position, past_key_values=cache,
                       use_cache=True).logits
        token.copy_(logits[:, -1:].argmax(-1))
        position.add_(1)
        cache_position.add_(1)

    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        _sync(device)
    return (time.perf_counter() - start) / steps


def e2e_rows(configs: tuple[tuple[int, int], ...], device: torch.device, steps: int, log: Log,
             copy_gbps: float | None = None, model_name: str = "random:llama-3.1-8b", cuda_graphs: bool = True,
             peer: bool = True) -> list[dict[str, Any]]:
    """Decode tokens/s of a random-weight model through kvlab's decode, ``full`` and ``block-route`` at 1/8,
    per (context, batch); with the roofline when ``copy_gbps`` is known, and transformers' static cache
    as the peer on CUDA (``peer``). A batch that does not fit is halved (the row says so)."""
    import kvlab
    from kvlab.methods import make_method

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    log(f"end to end: loading {model_name} ({dtype}) ...")
    model, _ = kvlab.load(model_name, dtype=dtype)
    model = model.to(device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elt = 2 if dtype == "bfloat16" else 4
    rows: list[dict[str, Any]] = []
    for context, batch in configs:
        kv_bytes = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * head_dim * elt
        asked = batch
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            while batch > 1 and kv_bytes * 1.15 > free:
                batch //= 2
                kv_bytes //= 2
        base = {"context": context, "batch": batch, "batch_asked": asked}
        # block-route routes every layer here (dense_layers=0); its summaries are 1/32 of the K/V bytes
        variants = [("full", lambda: make_method("full"), kv_bytes),
                    (f"block-route 1/{round(1 / E2E_BUDGET)}", lambda: make_method(
                        "block-route", budget=E2E_BUDGET, dense_layers=0), kv_bytes * E2E_BUDGET + kv_bytes / 32)]
        for name, make, read in variants:
            try:
                seconds, info = kvlab_step_seconds(model, make(), context, batch, steps, device, cuda_graphs)
                row = {**base, "variant": f"kvlab {name}", "cuda_graphs": cuda_graphs and device.type == "cuda",
                       **info, "ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds,
                       "bytes_per_step": int(weight_bytes + read)}
                if copy_gbps:
                    row["roofline_ms"] = 1e3 * row["bytes_per_step"] / (copy_gbps * 1e9)
                    row["of_roofline"] = row["ms_per_step"] / row["roofline_ms"]
                rows.append(row)
                log(f"  e2e {context // 1024}K × {batch}  {row['variant']:<28} {row['tokens_per_s']:9.1f} tok/s  "
                    f"{row['ms_per_step']:8.2f} ms/step" + (f"  ({row['of_roofline']:.2f}× roofline)"
                                                            if "of_roofline" in row else ""))
            except Exception as exc:  # noqa: BLE001 -- keep the other variants
                rows.append({**base, "variant": f"kvlab {name}", "error": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"  e2e {context // 1024}K × {batch}  kvlab {name:<22} error: {rows[-1]['error']}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if peer and device.type == "cuda":
            try:
                seconds = hf_static_step_seconds(model, context, batch, steps, device)
                rows.append({**base, "variant": "transformers StaticCache + SDPA (CUDA graph)",
                             "ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds})
                log(f"  e2e {context // 1024}K × {batch}  {'transformers StaticCache + SDPA':<28} "
                    f"{batch / seconds:9.1f} tok/s  {1e3 * seconds:8.2f} ms/step")
            except Exception as exc:  # noqa: BLE001 -- the peer is optional
                rows.append({**base, "variant": "transformers StaticCache + SDPA (CUDA graph)",
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]})
                log(f"  e2e {context // 1024}K × {batch}  transformers StaticCache error: {rows[-1]['error']}")
            finally:
                torch.cuda.empty_cache()
    del model
    return rows


def e2e_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The end-to-end goals of issue 13, as ratios from the same run."""
    by = {(r["context"], r["batch"], r["variant"]): r for r in rows if "ms_per_step" in r}
    out = []
    for (ctx, batch, variant), r in sorted(by.items()):
        if variant == "kvlab full" and ctx >= 131072 and batch > 1 and "of_roofline" in r:
            out.append({"target": f"kvlab full within 1.25× of the roofline at 128K × {batch}",
                        "measured": f"{r['of_roofline']:.2f}× ({r['ms_per_step']:.2f} vs {r['roofline_ms']:.2f} ms)",
                        "met": r["of_roofline"] <= 1.25})
        routed = by.get((ctx, batch, f"kvlab block-route 1/{round(1 / E2E_BUDGET)}"))
        if variant == "kvlab full" and ctx >= 131072 and routed:
            goal = 1.5 if batch == 1 else 2.5
            speedup = r["ms_per_step"] / routed["ms_per_step"]
            out.append({"target": f"block-route 1/8 ≥ {goal}× full end to end at 128K × {batch}",
                        "measured": f"{speedup:.2f}×", "met": speedup >= goal})
    return out
