"""``kvlab bench attention``: one decode step of attention on the CPU, full vs block-route vs gather.

Setup (issue 3): one decode query, 8 KV heads x 32 query heads, head_dim 128, fp32, contexts 8K /
32K / 64K, budget 1/8. Timed, each as the best of ``repeats`` runs after a warm-up (the machine
may be shared; the best run is the least disturbed):

- ``full``: dense attention over the whole row (the store's fast path, one SDPA call);
- ``block-route bs=16`` / ``bs=64``: scoring + top-k (``decode_plan`` of a step planned once: centroid
  scores, or Quest's bound), the attention over the selected blocks (copied block by block into a
  reused buffer), and both together;
- ``token gather``: the same number of tokens, scattered, gathered token by token;
- ``runs copy``: the bs=16 selection read as merged runs, one copy per run (Python loop).

Keys and values are random, so the selection is close to random blocks: the worst case for run
merging. Numbers are from one run on whatever machine runs it; the caller prints them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kvlab.attention import attend
from kvlab.attention.plans import ReadPlan
from kvlab.attention.sparse import WORKSPACE, attend_blocks, attend_tokens
from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import KVLabError, check
from kvlab.machine import cores, cpu_name

DEFAULT_CONTEXTS = (8192, 32768, 65536)


def _timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """``(wall, cpu)`` seconds: the best of ``repeats`` runs after a warm-up, by each clock.

    Wall-clock is what a user waits; process CPU time is robust when other work shares the cores
    (with one thread it is the work done; with several it also counts their spin-waiting).
    """
    fn()  # warm-up (also grows the workspace buffers once)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def make_layer(context: int, kv_heads: int, head_dim: int, device: str = "cpu", seed: int = 0) -> LayerStore:
    """A one-sequence layer holding ``context`` random tokens per KV head."""
    store = KVStore.empty(1, 1, kv_heads, head_dim, block_size=16, device=device)
    layer = store.layers[0]
    g = torch.Generator(device=device).manual_seed(seed)
    layer.reserve(context + 64)
    step = 8192
    for s in range(0, context, step):
        n = min(step, context - s)
        k = torch.randn(1, kv_heads, n, head_dim, generator=g, device=device)
        v = torch.randn(1, kv_heads, n, head_dim, generator=g, device=device)
        layer.append(k, v, torch.arange(s, s + n, device=device)[None, :])
    return layer


def bench_attention(contexts: tuple[int, ...] = DEFAULT_CONTEXTS, budget: float = 0.125, kv_heads: int = 8,
                    q_heads: int = 32, head_dim: int = 128, repeats: int = 5, device: str = "cpu",
                    threads: int | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"machine": ..., "rows": [...]}`` (one row per context and path)."""
    check(device in ("cpu", "cuda"), f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise KVLabError("--device cuda: no CUDA device is visible to torch here; "
                             "run `kvlab bench attention --device cpu`")
        raise KVLabError("--device cuda: this benchmark times the CPU torch paths; the GPU kernels are timed by "
                         "`kvlab bench gpu`")
    check(0 < budget <= 1, f"--budget must be in (0, 1], got {budget}")
    check(q_heads % kv_heads == 0, f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    if threads:
        torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(1)
    for context in contexts:
        check(context >= 1024, f"contexts must be at least 1024 tokens, got {context}")
        rows += _bench_context(context, budget, kv_heads, q_heads, head_dim, repeats, gen)
        WORKSPACE.clear()
    return {"machine": machine_description(), "load_average": _loadavg(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "setup": {"kv_heads": kv_heads, "q_heads": q_heads, "head_dim": head_dim, "budget": budget,
                      "dtype": "float32", "repeats": repeats, "statistic": "min"},
            "rows": rows}


def _bench_context(context: int, budget: float, kv_heads: int, q_heads: int, head_dim: int, repeats: int,
                   gen: torch.Generator) -> list[dict[str, Any]]:
    from kvlab.methods.base import StepPlan
    from kvlab.methods.block_route import BlockRoute

    scaling = head_dim ** -0.5
    layer = make_layer(context, kv_heads, head_dim)
    q = torch.randn(1, q_heads, 1, head_dim, generator=gen)
    qpos = torch.tensor([[context]])
    rows: list[dict[str, Any]] = []
    full = _timeit(lambda: attend(layer, q, qpos, scaling), repeats)

    def add(path: str, times: tuple[float, float], tokens: int, part: str) -> None:
        rows.append({"context": context, "path": path, "part": part, "ms": 1e3 * times[0],
                     "ratio_to_full": times[0] / full[0], "speedup": full[0] / times[0],
                     "cpu_ms": 1e3 * times[1], "cpu_ratio_to_full": times[1] / full[1],
                     "cpu_speedup": full[1] / times[1], "tokens_read_per_head": tokens})

    add("full", full, context, "attention")
    sel16 = None
    for bs, score in ((16, "centroid"), (16, "bound"), (64, "centroid")):
        method = BlockRoute(budget=budget, block_size=bs, score=score, dense_layers=0)
        # the step's host plan, made once (it builds the block metadata: prefill's job); the timings are its run
        step = method.plan_step(KVStore(layers=[layer], block_size=layer.block_size), StepPlan(0, new_tokens=0))
        t_score = _timeit(lambda m=method, s=step: m.decode_plan(0, layer, q, s), repeats)
        plan = method.decode_plan(0, layer, q, step)
        tokens = int((plan.token_slots(layer.lengths, layer.block_size) >= 0).sum(-1).max())
        t_attn = _timeit(lambda p=plan: attend(layer, q, qpos, scaling, p), repeats)
        t_total = _timeit(lambda m=method, s=step: attend(layer, q, qpos, scaling, m.decode_plan(0, layer, q, s)),
                          repeats)
        name = f"block-route bs={bs} {score}"
        add(name, t_score, tokens, "scoring + top-k")
        add(name, t_attn, tokens, "attention")
        add(name, t_total, tokens, "total")
        if bs == 16 and score == "centroid":
            sel16 = plan
            t_runs = _timeit(lambda p=plan: attend_blocks(layer, q, qpos, scaling, p.index, 16, mode="runs"), repeats)
            add(f"runs copy bs=16 ({_count_runs(plan.index)} runs/head)", t_runs, tokens, "attention")
    # token gather of as many tokens as the bs=16 selection, scattered uniformly
    n = int((sel16.token_slots(layer.lengths, layer.block_size) >= 0).sum(-1).max())
    idx = torch.stack([torch.randperm(context, generator=gen)[:n].sort().values for _ in range(kv_heads)])
    tok_plan = ReadPlan("tokens", idx[None])
    t_tok = _timeit(lambda: attend_tokens(layer, q, qpos, scaling, tok_plan.index, mode="gather"), repeats)
    add("token gather", t_tok, n, "attention")
    return rows


def _count_runs(index: torch.Tensor) -> int:
    idx = index.reshape(-1, index.shape[-1])
    runs = []
    for row in idx:
        row = row[row >= 0]
        runs.append(int((row[1:] != row[:-1] + 1).sum()) + (1 if row.numel() else 0))
    return round(sum(runs) / max(len(runs), 1))


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def machine_description() -> str:
    """CPU model and core count, from /proc/cpuinfo (lscpu's "Model name")."""
    return f"{cpu_name()}, {cores()} cores"
