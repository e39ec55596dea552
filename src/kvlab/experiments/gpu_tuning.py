"""Launch-configuration tuning of kvlab's paged decode kernel on the device it runs on (``kvlab bench gpu
--tune``): time a few configurations, return the fastest. Nothing global changes: the caller runs the
kernel with the result (:func:`kvlab.kernels.paged_attention.tuned`)."""

from __future__ import annotations

from typing import Any

import torch

from kvlab.experiments.bench_gpu_kernels import HEAD_DIM, KV_HEADS, decode_inputs, full_lists
from kvlab.experiments.gpu_timing import Log, graph_time_us, rotation

TUNE_CANDIDATES = [(block_n, warps, stages) for block_n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)]


def tune_paged_kernel(device: torch.device, warmup: int, iters: int, log: Log, context: int = 32768,
                      batch: int = 4) -> dict[str, Any]:
    """Time the paged kernel (full read, bs 16; CUDA-graph replay) in a few launch configurations.

    Returns ``{"context", "batch", "chosen", "default", "tried"}``: ``chosen`` is the fastest configuration
    (``BLOCK_N``, ``num_warps``, ``num_stages``; the defaults when none ran), for
    :func:`kvlab.kernels.paged_attention.tuned`.
    """
    from kvlab.kernels import paged_attention as pa

    rows, d = batch * KV_HEADS, HEAD_DIM
    copies = rotation(2 * rows * context * d * 2, device)
    keys, values, queries, out = decode_inputs(batch, context, copies, device)
    table, lens = full_lists(rows, context, device)
    default = dict(pa.TUNING)
    tried = []
    for block_n, warps, stages in TUNE_CANDIDATES:
        config = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        entry: dict[str, Any] = dict(config)
        try:  # CUDA-graph replay: eager launches are host-bound at these sizes and would hide the kernel
            entry["us"] = graph_time_us(lambda c, config=config: pa.paged_decode_attention(
                queries[c], keys[c], values[c], table, lens, 16, d**-0.5, max_tokens=context, out=out,
                config=config), copies, max(2, warmup // 3), max(10, iters // 3))
        except Exception as exc:  # noqa: BLE001 -- e.g. out of shared memory: skip the configuration
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        tried.append(entry)
    timed = [e for e in tried if "us" in e]
    best = min(timed, key=lambda e: e["us"]) if timed else {**default, "us": None}
    chosen = {k: best[k] for k in ("BLOCK_N", "num_warps", "num_stages")}
    log(f"paged kernel tuned at {context // 1024}K × {batch}: {chosen} "
        + (f"({best['us']:.1f} µs)" if best["us"] else "(no configuration ran; defaults kept)"))
    return {"context": context, "batch": batch, "chosen": chosen, "default": default, "tried": tried}
