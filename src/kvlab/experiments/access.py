"""H2, memory access dominates attention latency (``kvlab bench access``).

Claim (the premise of block-contiguous selection, as in Quest, Tang et al. 2024, arXiv 2406.10774,
and MoBA): at decode, attention is bound by reading K and V, so *how* the selected tokens are laid out
matters as much as how many: scattered token gathers (ClusterKV-style similarity selection) cost more
than the FLOPs they save, contiguous blocks do not.

Part 1 (microbenchmark): one decode query, equal token budget, only contiguity varied -- blocks of
1 (scattered), 4, 16, 64 and 256 tokens chosen at random, plus full attention -- at several context
lengths; time, and effective GB/s of K+V read against the machine's measured copy bandwidth. The read
paths are :mod:`kvlab.attention.sparse` (``attend_tokens`` gather for block 1, ``attend_blocks``
otherwise) when present, else the reference gather of :func:`kvlab.attention.torch_attention.attend_plan`.
On a CUDA device every read, the full one included, goes through kvlab's Triton paged kernel (one
kernel for every access pattern, as the kernels issue asks), in bf16, timed by replaying a CUDA graph
of the calls so that the host's launch overhead does not hide the memory access; full attention is
also timed through torch SDPA.

Part 2 (end to end): decode tokens/s on the real model at equal budget: ``full``, ``block-route``,
``cluster-route`` and ``cluster-route --relayout``, all from the same prefilled snapshot.

``kvlab bench access`` prints :func:`bench_access` and :func:`summarize_bench`; ``kvlab validate`` runs
:func:`run` (both parts) and reports :func:`summarize`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kvlab.attention import attend
from kvlab.attention.plans import ReadPlan
from kvlab.attention.torch_attention import attend_plan
from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import KVLabError, check
from kvlab.experiments.runner import Cells, TextPool, resolve, run_method
from kvlab.experiments.study import Config, Study
from kvlab.machine import cores, cpu_name

BLOCK_SIZES = (1, 4, 16, 64, 256)
E2E_METHODS = ["full", "block-route", "cluster-route", "cluster-route+relayout"]


def machine() -> str:
    """The CPU model and core count, for every figure."""
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads ({cores()} cores)"


def copy_bandwidth(mb: int = 256, reps: int = 5, device: str = "cpu") -> float:
    """Measured copy bandwidth in GB/s: bytes copied per second by ``dst.copy_(src)`` (best of ``reps``)."""
    n = mb * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return n * 4 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_layer(context: int, kv_heads: int, head_dim: int, seed: int = 0, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> LayerStore:
    """A one-sequence layer of ``context`` random keys and values (store blocks of 16)."""
    store = KVStore.empty(1, 1, kv_heads, head_dim, block_size=16, dtype=dtype, device=device)
    layer = store.layers[0]
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, kv_heads, context, head_dim, generator=g).to(device)
    v = torch.randn(1, kv_heads, context, head_dim, generator=g).to(device)
    pos = torch.arange(context, device=device)[None, :]
    layer.append(k, v, pos)
    return layer


def random_blocks(context: int, kv_heads: int, block: int, budget: float, seed: int) -> torch.Tensor:
    """``[1, H, n]`` ascending random block ids covering ``budget * context`` tokens per head."""
    n_blocks = context // block
    n = max(1, round(budget * context / block))
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randperm(n_blocks, generator=g)[:n].sort().values for _ in range(kv_heads)]
    return torch.stack(ids)[None]


def _reader(layer: LayerStore, block: int, index: torch.Tensor):
    try:
        from kvlab.attention import sparse
    except ImportError:
        sparse = None
    if sparse is not None and hasattr(sparse, "attend_blocks") and hasattr(sparse, "attend_tokens"):
        if block == 1:
            return "sparse.attend_tokens(gather)", lambda q, p, s: sparse.attend_tokens(layer, q, p, s, index,
                                                                                         mode="gather")
        return "sparse.attend_blocks", lambda q, p, s: sparse.attend_blocks(layer, q, p, s, index, block_size=block)
    plan = ReadPlan("tokens", _token_index(index, block))
    return "attend_plan (reference)", lambda q, p, s: attend_plan(layer, q, p, s, plan)


def _kernel_reader(layer: LayerStore, block: int, index: torch.Tensor):
    """The Triton paged kernel over the blocks ``index`` ``[1, H, n]`` of ``block`` tokens, lists built once."""
    from kvlab.attention.reads import read_lists
    from kvlab.kernels.paged_attention import paged_decode_attention

    plan = ReadPlan("tokens", index) if block == 1 else ReadPlan("blocks", index, block_size=block)
    lists = read_lists(layer, plan)

    def run(q: torch.Tensor, pos: torch.Tensor, scaling: float) -> torch.Tensor:
        qg = q.view(1, layer.kv_heads, -1, q.shape[-1]).to(layer.dtype)  # one query token: heads grouped
        return paged_decode_attention(qg, layer.keys, layer.values, lists.table, lists.seq_lens, lists.block_size,
                                      scaling, row_offsets=lists.row_offsets, max_tokens=lists.max_tokens)

    return f"triton paged kernel (bs={block})", run


def _time_cuda(fn, reps: int) -> tuple[float, float | None]:
    """``(seconds per call from a CUDA-graph replay, eager seconds)``; the graph time is the kernel's own."""
    from kvlab.experiments.gpu_timing import cuda_time_us, graph_time_us

    eager = cuda_time_us(lambda _: fn(), 1, warmup=5, iters=max(reps, 20)) / 1e6
    try:
        return graph_time_us(lambda _: fn(), 1, warmup=3, iters=max(reps, 10)) / 1e6, eager
    except Exception:  # noqa: BLE001 -- not capturable: fall back to the eager time
        return eager, eager


def _token_index(index: torch.Tensor, block: int) -> torch.Tensor:
    return (index[..., None] * block + torch.arange(block)).flatten(-2)


def _time(fn, reps: int, device: str, min_seconds: float = 0.4, max_reps: int = 200) -> float:
    """Best time of at least ``reps`` runs, repeated until ``min_seconds`` have been spent (at most
    ``max_reps``): on a shared machine the minimum over many short runs is the undisturbed time."""
    fn()  # warm-up (buffers, caches)
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_seconds and len(times) < max_reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)  # best of reps: the machine is shared, noise only adds time


def bench_access(contexts: list[int], budget: float = 0.125, kv_heads: int = 8, q_heads: int = 32,
                 head_dim: int = 128, block_sizes: tuple[int, ...] = BLOCK_SIZES, reps: int = 7,
                 device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Time attention of one decode query at equal token budget, varying only contiguity."""
    check(0 < budget < 1, f"budget must be in (0, 1), got {budget}")
    check(all(c % max(block_sizes) == 0 for c in contexts),
          f"contexts must be multiples of {max(block_sizes)} tokens, got {contexts}")
    check(budget * min(contexts) >= max(block_sizes),
          f"a budget of {budget:g} × {min(contexts)} tokens is smaller than one block of {max(block_sizes)}; "
          f"use contexts of at least {round(max(block_sizes) / budget)} tokens")
    bw = copy_bandwidth(device=device)
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    elt = torch.finfo(dtype).bits // 8
    rows = []
    # Warm-up sweep on the smallest context: first calls pay for lazy initialisation and buffer growth.
    warm = make_layer(min(contexts), kv_heads, head_dim, seed, device, dtype)
    wq = torch.randn(1, q_heads, 1, head_dim).to(device, dtype)
    wpos = torch.tensor([[min(contexts)]], device=device)
    reader = _kernel_reader if cuda else _reader
    for block in block_sizes:
        reader(warm, block, random_blocks(min(contexts), kv_heads, block, budget, seed).to(device))[1](
            wq, wpos, head_dim ** -0.5)
    from kvlab.progress import track

    def timed(fn) -> tuple[float, float | None]:
        return _time_cuda(fn, reps) if cuda else (_time(fn, reps, device), None)

    for context in track(contexts, f"bench access ({device})"):
        layer = make_layer(context, kv_heads, head_dim, seed, device, dtype)
        q = torch.randn(1, q_heads, 1, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        pos = torch.tensor([[context]], device=device)
        scaling = head_dim ** -0.5
        full_t, full_eager = timed(lambda layer=layer, q=q, pos=pos, s=scaling: attend(layer, q, pos, s))
        full_bytes = context * kv_heads * head_dim * 2 * elt
        rows.append({"context": context, "block": "full", "path": "attend (dense; torch SDPA)", "tokens": context,
                     "seconds": full_t, "eager_seconds": full_eager, "gbps": full_bytes / full_t / 1e9,
                     "copy_gbps": bw, "vs_full": 1.0})
        # The whole context through the same path as the sparse reads (every block once).
        every = torch.arange(context // max(block_sizes))[None, None, :].expand(1, kv_heads, -1).to(device)
        name, fn = reader(layer, max(block_sizes), every)
        t_all, all_eager = timed(lambda fn=fn, q=q, pos=pos, s=scaling: fn(q, pos, s))
        rows.append({"context": context, "block": "all", "path": name + " (every block)", "tokens": context,
                     "seconds": t_all, "eager_seconds": all_eager, "gbps": full_bytes / t_all / 1e9,
                     "copy_gbps": bw, "vs_full": t_all / full_t})
        for block in block_sizes:
            index = random_blocks(context, kv_heads, block, budget, seed + block).to(device)
            name, fn = reader(layer, block, index)
            t, eager = timed(lambda fn=fn, q=q, pos=pos, s=scaling: fn(q, pos, s))
            tokens = int(index.shape[-1]) * block
            nbytes = tokens * kv_heads * head_dim * 2 * elt
            rows.append({"context": context, "block": block, "path": name, "tokens": tokens, "seconds": t,
                         "eager_seconds": eager, "gbps": nbytes / t / 1e9, "copy_gbps": bw, "vs_full": t / full_t})
    return {"device": device, "machine": machine() if not cuda else torch.cuda.get_device_name(),
            "dtype": str(dtype).removeprefix("torch."), "timing": "CUDA-graph replay" if cuda else "best of runs",
            "budget": budget, "kv_heads": kv_heads, "q_heads": q_heads, "head_dim": head_dim,
            "copy_gbps": bw, "rows": rows}


def summarize_bench(result: dict[str, Any]) -> dict[str, Any]:
    """Verdict: scattered (block 1) vs contiguous (best of ≥ 16) time, and whether the gap widens with length."""
    rows = result["rows"]
    contexts = sorted({r["context"] for r in rows})
    gaps = []
    for c in contexts:
        by = {r["block"]: r for r in rows if r["context"] == c}
        contiguous = min(by[b]["seconds"] for b in by if isinstance(b, int) and b >= 16)
        gaps.append({"context": c, "scattered_s": by[1]["seconds"], "contiguous_s": contiguous,
                     "full_s": by["full"]["seconds"], "all_s": by.get("all", by["full"])["seconds"],
                     "gap": by[1]["seconds"] / contiguous,
                     "scattered_vs_full": by[1]["seconds"] / by["full"]["seconds"],
                     "ideal_vs_full": result["budget"]})
    widening = len(gaps) >= 2 and gaps[-1]["gap"] >= gaps[0]["gap"]
    costly = all(g["gap"] > 1.5 for g in gaps)
    verdict = "supported" if costly and widening else ("not supported" if not any(g["gap"] > 1.2 for g in gaps)
                                                       else "inconclusive")
    every = "the Triton kernel" if str(result.get("device", "cpu")).startswith("cuda") else "the sparse path"
    text = "; ".join(f"{g['context']}: scattered {_duration(g['scattered_s'])} vs contiguous "
                     f"{_duration(g['contiguous_s'])} ({g['gap']:.2f}×), full {_duration(g['full_s'])} "
                     f"(every block via {every} {_duration(g['all_s'])})"
                     for g in gaps)
    return {"gaps": gaps, "widening": widening, "verdict": verdict, "summary": text}


def _duration(seconds: float) -> str:
    return f"{1e6 * seconds:.1f} µs" if seconds < 1e-4 else f"{1e3 * seconds:.2f} ms"


def load_access_result(path: Path) -> dict[str, Any]:
    """A ``kvlab bench access --json`` result measured elsewhere (a GPU machine), for H2."""
    path = Path(path)
    check(path.is_file(), f"--access-result {path}: no such file")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KVLabError(f"--access-result {path}: not JSON ({exc})") from None
    need = ("device", "budget", "kv_heads", "q_heads", "head_dim", "copy_gbps", "rows")
    missing = [k for k in need if not isinstance(res, dict) or k not in res]
    check(not missing, f"--access-result {path}: not a `kvlab bench access --json` result (missing "
                       f"{', '.join(missing)})")
    blocks = {r.get("block") for r in res["rows"]}
    check({"full", 1, 16}.issubset(blocks), f"--access-result {path}: needs rows for full attention and blocks "
                                           "of 1 and 16 tokens")
    return {**res, "source": f"from {path.name}"}


def run_e2e(pool: TextPool, cells: Cells, model_name: str, budget: float, steps: int, notes: list[str],
            cuda_graphs: bool = True) -> dict[str, Any]:
    """Part 2: decode tokens/s of :data:`E2E_METHODS` at ``budget`` from the pool's longest snapshot."""
    length = pool.lengths[-1]
    specs = resolve(E2E_METHODS, notes, budget)
    rows = []
    for s in specs:
        key = {"model": model_name, "method": s.label, "budget": budget, "steps": steps, "length": length}
        cell = cells.get("e2e", key)
        if cell is None:
            snap, _ = pool.at(length)
            try:
                res = run_method(pool.model, snap, s.make(budget), None, steps + 1, label=f"e2e {s.label}",
                                 cuda_graphs=cuda_graphs)
            except Exception as exc:
                notes.append(f"e2e: {s.label} failed: {exc}")
                continue
            batch = snap.context_lengths.shape[0]
            cell = cells.put("e2e", key, {"method": s.label, "seconds": res.seconds, "steps": res.steps,
                                          "compress_seconds": res.compress_seconds,
                                          "tokens_per_second": res.steps * batch / res.seconds})
        rows.append(cell)
    return {"rows": rows, "budget": budget, "context": length, "batch": len(pool.kinds)}


# ----------------------------------------------------------------------------- kvlab validate
def run(study: Study) -> dict[str, Any]:
    """H2's measurements: the access benchmark on the CPU (and on CUDA when there is one and
    ``device_bench``), the ones given with ``--access-result``, and the end-to-end decode on the first
    profile pool."""
    cfg = study.cfg
    benches = []
    devices = ["cpu"] + (["cuda"] if study.device_bench and torch.cuda.is_available() else [])
    for dev in devices:
        key = {"contexts": cfg.access_contexts, "reps": cfg.access_reps, "device": dev, "machine": machine()}
        cell = study.cells.get("access", key)
        if cell is None:
            cell = study.cells.put("access", key, bench_access(cfg.access_contexts, reps=cfg.access_reps, device=dev,
                                                               seed=cfg.seed))
        benches.append(cell)
    benches.extend(study.extra_benches)
    e2e = run_e2e(study.pools[0], study.cells, study.model_name, cfg.e2e_budget, cfg.e2e_steps, study.notes,
                  study.cuda_graphs)
    return {"bench": benches, "e2e": e2e}


def summarize(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """H2's section from the access benchmarks (the CPU's first; GPU ones measured here or given with
    ``--access-result``) and the end-to-end decode. The claim is about GPUs: a GPU bench, when there is
    one, gives the verdict, and the CPU's is reported beside it."""
    benches, e2e = data["bench"], data["e2e"]
    sums = [summarize_bench(b) for b in benches]
    gpu = [s for b, s in zip(benches, sums, strict=True) if b["device"].startswith("cuda")]
    verdict = (gpu or sums)[0]["verdict"]
    tps = {r["method"]: r["tokens_per_second"] for r in e2e.get("rows", [])}
    e2e_text = ", ".join(f"{m} {v:.2f} tok/s" for m, v in tps.items())
    text = "; ".join(f"[{b.get('machine', b['device'])}: {s['verdict']}] {s['summary']}"
                     for b, s in zip(benches, sums, strict=True))
    text += (f"; end to end on the CPU ({e2e.get('context')} tokens × {e2e.get('batch')}, "
             f"budget {e2e.get('budget')}): {e2e_text or 'not run'}")
    kinds = "; ".join(f"{b.get('machine', b['device'])}: {b.get('dtype', 'float32')}, "
                      f"{b.get('timing', 'best of runs')}, copy bandwidth {b['copy_gbps']:.1f} GB/s"
                      + (f", {b['source']}" if b.get("source") else "") for b in benches)
    return {"verdict": verdict, "bench": benches, "bench_summary": sums, "e2e": e2e,
            "measurement": f"One decode query ({benches[0]['q_heads']} query heads, {benches[0]['kv_heads']} KV heads, "
                           f"head_dim {benches[0]['head_dim']}) over random K/V at budget "
                           f"{benches[0]['budget']:g}: random blocks of 1 (scattered gather), 4, 16, 64, 256 tokens "
                           f"vs full attention ({kinds}). Supported when scattered is > 1.5× slower than "
                           "the best contiguous read (blocks ≥ 16) at every length and the gap does not shrink with "
                           "length; a GPU measurement decides, since the claim is about GPUs. End to end: decode "
                           "tokens/s on the real model from one snapshot.",
            "text": text}
