"""Perplexity per rank for ``low-rank``: V-only and K+V, keys pre- and post-RoPE (docs/benchmarks.md).

The whole evaluation text goes through the model in chunks with *every* cached vector compressed
from the start (each chunk's queries attend over the latents of all earlier tokens and of the chunk
itself), the setting in which Palu and Eigen Attention report perplexity. Text: the evaluation half of
the stdlib modules (:func:`kvlab.experiments.calibrate.stdlib_files`), disjoint from the calibration half.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from kvlab.methods.base import Method


@torch.inference_mode()
def perplexity(model: Any, ids: list[int], method: Method | None = None, chunk: int = 256,
               block_size: int = 16) -> float:
    """Perplexity of ``ids`` (batch 1) with ``method`` applied to the store from the first token on: the
    first token is prefilled, the method compresses it, and the rest is teacher-forced through
    :func:`kvlab.generation.decode` ``chunk`` tokens per forward (the first target is predicted from the
    uncompressed first token)."""
    from kvlab.generation import decode, prefill
    from kvlab.methods import make_method

    snapshot = prefill(model, [ids[:1]], block_size=block_size, reserve_tokens=len(ids), observe=1)
    result = decode(model, snapshot, method or make_method("full"), 0, forced=[ids[1:]], forced_chunk=chunk,
                    label=f"perplexity ({(method or make_method('full')).name})")
    return math.exp(float(result.forced_nll.double().mean()))


def run(model_name: str = "qwen2.5-coder-0.5b", ranks: tuple[int, ...] = (16, 32, 48, 56, 60), tokens: int = 1024,
        orthogonal_ranks: tuple[int, ...] = (32, 48, 60), calib_tokens: int = 2048) -> list[dict[str, Any]]:
    import kvlab
    from kvlab.experiments.calibrate import calibrate, calibration_path, text_ids
    from kvlab.methods import make_method

    model, tok = kvlab.load(model_name)
    missing = [r for r in ranks if not calibration_path(model_name, r).is_file()]
    if missing:
        calibrate(model_name, missing, tokens=calib_tokens, model=model, tokenizer=tok)
    ids = text_ids(tok, tokens, part=1)
    rows: list[dict[str, Any]] = []

    def measure(label: str, method: Method | None, rank: int | None) -> None:
        t = time.perf_counter()
        ppl = perplexity(model, ids, method)
        base = rows[0]["ppl"] if rows else ppl
        rows.append({"config": label, "rank": rank, "ppl": round(ppl, 4), "change_%": round(100 * (ppl / base - 1), 2),
                     "seconds": round(time.perf_counter() - t, 1)})
        print(rows[-1], flush=True)

    measure("full", None, None)
    for r in ranks:
        measure("pca v-only", make_method("low-rank", rank=r, mode="v-only", projection="pca"), r)
        measure("pca kv, keys pre-RoPE", make_method("low-rank", rank=r, mode="kv", projection="pca"), r)
        measure("pca kv, keys post-RoPE", make_method("low-rank", rank=r, mode="kv", projection="pca",
                                                      keys="post-rope"), r)
    for r in orthogonal_ranks:
        measure("orthogonal v-only", make_method("low-rank", rank=r, mode="v-only"), r)
        measure("orthogonal kv, keys pre-RoPE", make_method("low-rank", rank=r, mode="kv"), r)
    return rows


if __name__ == "__main__":
    import json
    import sys

    out = run(tokens=int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
    print(json.dumps(out, indent=2))
