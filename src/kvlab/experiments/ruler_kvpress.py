"""RULER's ``--engine kvpress``: NVIDIA kvpress 0.5.5's own pipeline on the samples
:mod:`kvlab.experiments.ruler` saved, question-agnostic as on kvpress's leaderboard (the context compressed by
the press during prefill, then the question and greedy decoding on the compressed cache).

The pipeline's ``__call__`` wraps the context in the model's chat template; lm-eval's RULER prompt is a plain
completion prompt, so the pipeline's compress-and-answer step (``_forward``) is given the very token ids the other
engines read: the context up to the question, and the question with its answer prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.experiments.ruler import Sample, cell_key, new_tokens, order, score, token_split
from kvlab.experiments.runner import Cells
from kvlab.progress import track


def presses() -> dict[str, Callable[[float], Any]]:
    """kvlab's method name -> kvpress's press at a compression ratio (defaults that keep the same tokens:
    ``tests/test_kvpress_crosscheck.py``)."""
    try:
        import kvpress
    except ImportError as exc:
        raise KVLabError("--engine kvpress needs kvpress 0.5.5 (kvlab's main environment, .venv: make installs "
                         "it)") from exc
    return {
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "pyramidkv": lambda r: kvpress.PyramidKVPress(compression_ratio=r),
        "ada-snapkv": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
        "streaming": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
    }


def check_methods(methods: list[str]) -> None:
    known = presses()
    for m in methods:
        check(m == "full" or m in known,
              f"--engine kvpress runs full and the presses both libraries have; {m!r} is not one "
              f"(allowed: full, {', '.join(known)})")


def run_kvpress(model: Any, tokenizer: Any, model_name: str, samples: list[Sample], runs: list[tuple[str, float]],
                cells: Cells, length: int, max_new: int | None = None) -> list[dict[str, Any]]:
    """Every ``(method, ratio)`` of ``runs`` on every sample through kvpress's pipeline (``full``: no press)."""
    import torch
    from transformers import pipeline

    check_methods([m for m, _ in runs])
    make = presses()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    out = []
    for sample in track(order(samples), f"RULER kvpress {model_name}"):
        ids, ctx_end = token_split(tokenizer, sample)
        inputs = {"context_ids": torch.tensor([ids[:ctx_end]]), "questions_ids": [torch.tensor([ids[ctx_end:]])]}
        n_new = new_tokens(sample, max_new)
        for method, ratio in runs:
            key = cell_key("kvpress", model_name, sample, method, ratio, "agnostic", length, n_new)
            cell = cells.get("ruler", key)
            if cell is None:
                press = None if method == "full" else make[method](ratio)
                with torch.no_grad():
                    answer = pipe._forward(inputs, max_new_tokens=n_new, press=press)[0]
                cell = cells.put("ruler", key, {**key, "answer": answer, "score": score(sample, answer),
                                                "seconds": None})
            out.append(cell)
    return out
