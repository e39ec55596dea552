"""GPU benchmark of decode attention (``kvlab bench gpu``): kvlab's Triton kernels against library kernels,
and end to end, in one run on one device. This module is the run; the parts are their own modules:

1. the device (:mod:`~kvlab.experiments.gpu_timing`): copy bandwidth (``dst.copy_(src)`` of 1 GiB, read +
   write bytes counted) and bf16 matmul rate (8192³); every bandwidth below is compared with the copy
   bandwidth;
2. the paged kernel's launch configuration, tuned on this device (:mod:`~kvlab.experiments.gpu_tuning`)
   and used for the rest of the run;
3. the decode-attention kernel table (:mod:`~kvlab.experiments.bench_gpu_kernels`): SDPA, flash-attn,
   FlashInfer, kvlab full, block-route at 1/4-1/16 (unfused and fused selection), block sizes 1/16/64;
4. end to end (:mod:`~kvlab.experiments.bench_gpu_e2e`): decode tokens/s of a random-weight
   ``llama-3.1-8b`` through :func:`kvlab.generation.decode` with CUDA graphs, ``full`` and ``block-route``
   at 1/8, at 32K × 1, 128K × 1 and 128K × 4 (× 2 where 4 does not fit), beside the roofline and
   transformers' ``StaticCache`` + SDPA step replayed from a CUDA graph.

Results go to ``benchmarks/results/<device>.json``; :mod:`~kvlab.experiments.gpu_report` prints them and
writes them into docs/benchmarks.md. No quality is measured (selections are random).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import check
from kvlab.experiments.bench_gpu_e2e import E2E_CONFIGS, e2e_rows, e2e_targets
from kvlab.experiments.bench_gpu_kernels import (
    DEFAULT_BATCHES,
    DEFAULT_CONTEXTS,
    HEAD_DIM,
    KV_HEADS,
    Q_HEADS,
    QUICK_BATCHES,
    QUICK_CONTEXTS,
    add_speedups,
    attention_rows,
    evaluate_targets,
)
from kvlab.experiments.gpu_timing import Log, device_rates, device_slug, library_versions, require_cuda
from kvlab.experiments.gpu_tuning import tune_paged_kernel

RESULTS_DIR = Path("benchmarks/results")


def run_gpu_benchmark(contexts: tuple[int, ...] | None = None, batches: tuple[int, ...] | None = None, *,
                      quick: bool = False, e2e: bool = True, tune: bool = True, attention: bool = True,
                      e2e_configs: tuple[tuple[int, int], ...] = E2E_CONFIGS, cuda_graphs: bool = True,
                      e2e_steps: int = 32, warmup: int = 10, iters: int = 50,
                      out_dir: Path | str | None = RESULTS_DIR, log: Log | None = None) -> dict[str, Any]:
    """Run the GPU benchmark; returns the result dict and writes ``<out_dir>/<device>.json``.

    ``quick``: contexts 8K and 32K, batch 1 and 4, end to end at 32K only. ``tune``: first pick the
    paged kernel's launch configuration on this device (:func:`~kvlab.experiments.gpu_tuning.tune_paged_kernel`),
    used for every kvlab kernel of the run. ``attention``:
    the kernel table (off: only the device rates and the end to end). ``cuda_graphs``: end to end with
    CUDA graphs (the default) or eager steps. ``log`` receives progress lines (default: print). Raises
    :class:`~kvlab.errors.KVLabError` without a CUDA device.
    """
    log = log or print
    device = require_cuda()
    contexts = tuple(contexts or (QUICK_CONTEXTS if quick else DEFAULT_CONTEXTS))
    batches = tuple(batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES))
    if quick:
        e2e_configs = tuple(c for c in e2e_configs if c[0] <= 32768) or ((32768, 1),)
    for c in contexts:
        check(c >= 1024 and c % 1024 == 0, f"contexts must be multiples of 1024 tokens, got {c}")
    for b in batches:
        check(b >= 1, f"batch sizes must be >= 1, got {b}")
    name = torch.cuda.get_device_name(device)
    log(f"device: {name}")
    rates = device_rates(device, warmup, iters)
    torch.cuda.empty_cache()
    log(f"copy {rates['copy_GBps']:.0f} GB/s, bf16 matmul {rates['matmul_TFLOPs']:.0f} TFLOP/s")
    tuning = tune_paged_kernel(device, warmup, iters, log) if tune else None
    torch.cuda.empty_cache()
    from kvlab.kernels import paged_attention  # imports triton: after require_cuda

    # every kvlab kernel launch of the run, kernel table and end to end, with the tuned configuration
    with paged_attention.tuned(tuning["chosen"]) if tuning else contextlib.nullcontext():
        rows: list[dict[str, Any]] = []
        for context in contexts if attention else ():
            for batch in batches:
                rows.extend(attention_rows(context, batch, device, warmup, iters, log))
                torch.cuda.empty_cache()
        e2e_result = e2e_rows(tuple(e2e_configs), device, e2e_steps, log, rates["copy_GBps"],
                              cuda_graphs=cuda_graphs) if e2e else []
    for r in rows:
        if "GBps" in r:
            r["of_copy_bw"] = r["GBps"] / rates["copy_GBps"]
    add_speedups(rows)
    result: dict[str, Any] = {
        "status": "measured",
        "device": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "device_rates": rates,
        "tuning": tuning,
        "setup": {"kv_heads": KV_HEADS, "q_heads": Q_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                  "decode_queries": 1, "warmup": warmup, "iters": iters, "statistic": "median of CUDA-event times",
                  "contexts": list(contexts), "batches": list(batches),
                  "bytes": "K and V of the tokens read + block tables + summaries (when scoring) + query + output"},
        "attention": rows,
        "targets": evaluate_targets(rows, rates["copy_GBps"]) + evaluate_targets(rows, rates["copy_GBps"], "us_graph"),
        "e2e": e2e_result,
    }
    result["targets"] += e2e_targets(result["e2e"])
    if out_dir is not None:
        path = Path(out_dir) / f"{device_slug(name)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        result["path"] = str(path)
        log(f"wrote {path}")
    return result
