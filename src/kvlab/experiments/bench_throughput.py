"""``kvlab bench throughput``: decode tokens/s and cache size as eviction compresses the cache.

Prefill once (:func:`kvlab.generation.prefill`), then decode the same snapshot with every
(method, ratio): greedy, no EOS, ``new_tokens`` steps. Ratio 0 is the uncompressed cache (``full``),
run once. Prompts are seeded random token ids: throughput does not depend on what the text says.
With ``rounds > 1`` every configuration is decoded once per round, round-robin, and the fastest
round is reported (a shared machine's other load only ever slows a round down).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvlab.errors import check
from kvlab.machine import cpu_name
from kvlab.progress import track

DEFAULT_RATIOS = (0.0, 0.5, 0.75, 0.875, 0.9375)
DEFAULT_METHODS = ("kv-compress", "snapkv")


@dataclass
class ThroughputConfig:
    model: str = "qwen2.5-coder-0.5b"
    batch: int = 8
    context: int = 4096
    new_tokens: int = 32
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    methods: tuple[str, ...] = DEFAULT_METHODS
    block_size: int = 16
    dtype: str = "float32"
    seed: int = 0
    rounds: int = 1
    threads: int | None = None  # torch CPU threads (None: torch's default)
    cuda_graphs: bool = True  # on CUDA: decode steps replayed from CUDA graphs
    params: dict[str, Any] = field(default_factory=dict)  # extra method parameters, by method name


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def prompts(vocab_size: int, batch: int, context: int, seed: int) -> list[list[int]]:
    """Seeded random token ids (below 150000, clear of Qwen's special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 150_000), (batch, context), generator=generator).tolist()


def run(cfg: ThroughputConfig) -> dict[str, Any]:
    """Run the benchmark; returns the config, the machine and one row per (method, ratio)."""
    import kvlab
    from kvlab.generation import decode, prefill

    check(cfg.batch >= 1 and cfg.context >= 1 and cfg.new_tokens >= 2 and cfg.rounds >= 1,
          "batch, context and rounds must be >= 1 and new_tokens >= 2")
    for r in cfg.ratios:
        check(0 <= r < 1, f"ratios must be in [0, 1), got {r}")
    for name in cfg.methods:
        check(name in kvlab.METHODS, f"unknown method {name!r}; allowed: {', '.join(sorted(kvlab.METHODS))}")
    configs = [("full", 0.0)] if 0.0 in cfg.ratios else []
    configs += [(m, r) for m in cfg.methods for r in cfg.ratios if r > 0]
    def make(name: str, ratio: float) -> kvlab.Method:  # a fresh one per decode: methods keep state
        return kvlab.make_method(name, **({} if name == "full" else {"ratio": ratio, **cfg.params.get(name, {})}))

    methods = [make(m, r) for m, r in configs]  # validate everything before the model loads
    if cfg.threads is not None:
        check(cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    model, _ = kvlab.load(cfg.model, dtype=cfg.dtype)
    ids = prompts(model.config.vocab_size, cfg.batch, cfg.context, cfg.seed)
    observe = max(1, *(m.observation_window() for m in methods))
    snapshot = prefill(model, ids, block_size=cfg.block_size, reserve_tokens=cfg.new_tokens, observe=observe)
    decode(model, snapshot, kvlab.make_method("full"), max_new_tokens=2)  # warm-up, not timed
    best: dict[tuple[str, float], dict[str, Any]] = {}
    runs = [c for _ in range(cfg.rounds) for c in configs]
    for name, ratio in track(runs, "decode configs"):
        start = time.perf_counter()
        result = decode(model, snapshot, make(name, ratio), max_new_tokens=cfg.new_tokens, cuda_graphs=cfg.cuda_graphs)
        total = time.perf_counter() - start
        row = {
            "method": name, "ratio": ratio,
            "kept %": 100.0 * float(result.kept_after_prefill.sum()) / float(snapshot.store.lengths().sum()),
            "cache MB": result.bytes_after_prefill / 2**20,
            "decode tok/s": cfg.batch / result.seconds_per_step,
            "ms/step": 1000 * result.seconds_per_step,
            "compress s": total - result.decode_seconds,
        }
        if (name, ratio) not in best or row["decode tok/s"] > best[(name, ratio)]["decode tok/s"]:
            best[(name, ratio)] = row
    rows = [best[c] for c in configs]
    base = next((r["decode tok/s"] for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["speedup"] = r["decode tok/s"] / base if base else None
    return {"config": asdict(cfg), "machine": machine(), "prefill_seconds": snapshot.prefill_seconds,
            "cache_mb_full": snapshot.store.kv_bytes_allocated() / 2**20, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table (for docs/benchmarks.md)."""
    cols = ["method", "ratio", "kept %", "cache MB", "decode tok/s", "ms/step", "speedup", "compress s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
