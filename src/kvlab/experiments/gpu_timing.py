"""Timing on a CUDA device, for the GPU benchmarks (``kvlab bench gpu``, ``kvlab bench access``): the device
check, CUDA-event timings of eager calls and of calls replayed from a CUDA graph, the device's copy
bandwidth and matmul rate, and the library versions a result records."""

from __future__ import annotations

import importlib
import math
import re
import statistics
from collections.abc import Callable
from typing import Any

import torch

from kvlab.errors import KVLabError

Log = Callable[[str], None]


def require_cuda() -> torch.device:
    """The CUDA device, or one clear error."""
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise KVLabError(f"the GPU benchmark needs a CUDA GPU, and torch {torch.__version__} here {why}; run "
                         "`kvlab bench gpu` on a machine with an NVIDIA GPU, a CUDA build of torch and kvlab[triton]")
    try:
        importlib.import_module("triton")
    except ImportError:
        raise KVLabError("the GPU benchmark needs triton: pip install 'kvlab[triton]'") from None
    return torch.device("cuda", torch.cuda.current_device())


def cuda_time_us(fn: Callable[[int], Any], rotate: int = 1, warmup: int = 10, iters: int = 50) -> float:
    """Median time of ``fn(i % rotate)`` in µs, from CUDA events, after ``warmup`` calls."""
    for i in range(warmup):
        fn(i % rotate)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i % rotate)
        ends[i].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def graph_time_us(fn: Callable[[int], Any], rotate: int = 1, warmup: int = 3, iters: int = 20,
                  calls: int = 16) -> float:
    """Time per call of ``fn`` with the host's launch overhead taken out: ``calls`` calls (rotating over
    the ``rotate`` input copies) captured in one CUDA graph, the median replay divided by ``calls``.

    Raises whatever the capture raises (a function that syncs or allocates on the host cannot be
    captured); callers report that instead of a time.
    """
    calls = max(calls, rotate) // rotate * rotate
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for i in range(2 * rotate):
            fn(i % rotate)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % rotate)
    return cuda_time_us(lambda _: graph.replay(), 1, warmup, iters) / calls


def device_rates(device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s)."""
    free, _ = torch.cuda.mem_get_info(device)
    n = min(1 << 30, free // 8)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t_copy = cuda_time_us(lambda _: dst.copy_(src), warmup=warmup, iters=iters)
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    t_mm = cuda_time_us(lambda _: a @ b, warmup=warmup, iters=max(10, iters // 5))
    return {"copy_bytes": 2 * n, "copy_us": t_copy, "copy_GBps": 2 * n / t_copy / 1e3,
            "matmul_n": m, "matmul_us": t_mm, "matmul_TFLOPs": 2 * m**3 / t_mm / 1e6}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "flash_attn", "flashinfer"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception:  # noqa: BLE001 -- a broken optional install counts as absent
            out[name] = None
    return out


def rotation(bytes_per_copy: int, device: torch.device) -> int:
    """Input copies to rotate over so that together they are at least 4× the L2 cache (at most 8)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or 50 << 20
    return max(1, min(8, math.ceil(4 * l2 / max(bytes_per_copy, 1))))


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
