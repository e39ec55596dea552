"""The demo: one long real prompt, prefilled once, answered under several methods side by side."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

from kvlab.generation import decode, decode_texts, encode_prompts, eos_ids, prefill
from kvlab.methods import make_method

QUESTION = ("\n\nQuestion: which function defined in the module above removes any common leading whitespace "
            "from every line of a text? Answer with the function name only.")


def demo_prompt(max_chars: int = 9000) -> str:
    """The start and the end of the standard library's ``textwrap.py`` (real code), then a question."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    if len(source) > max_chars:
        source = source[: max_chars // 3] + "\n# ...\n" + source[-2 * max_chars // 3:]
    return "Here is a Python module:\n\n" + source + QUESTION


def run(model: Any, tokenizer: Any, methods: list[tuple[str, dict[str, Any]]], prompt: str | None = None,
        max_new_tokens: int = 12, cuda_graphs: bool = True) -> list[dict[str, Any]]:
    """Prefill ``prompt`` once; decode it with each ``(method, params)``; one table row per method.

    Every method decodes the same ``max_new_tokens`` steps (the answer is cut at its end of sequence), after one
    untimed warm-up decode, so "decode tok/s" is the rate of as many warm steps for each method, not the
    one-time cost of a first decode spread over a two-token answer."""
    ids = encode_prompts(tokenizer, [prompt or demo_prompt()])
    snapshot = prefill(model, ids, reserve_tokens=max_new_tokens)
    full_tokens = int(snapshot.store.lengths().sum())
    eos = eos_ids(tokenizer, model)
    decode(model, snapshot, make_method("full"), 2, cuda_graphs=cuda_graphs, label="warm-up")
    rows = []
    for name, params in methods:
        method = make_method(name, **params)
        result = decode(model, snapshot, method, max_new_tokens, cuda_graphs=cuda_graphs)
        answer = decode_texts(tokenizer, result.tokens[:1], eos)[0]
        rows.append({
            "method": name + "".join(f" {k}={v}" for k, v in params.items()),
            "prompt tokens": int(snapshot.context_lengths[0]),
            "tokens held %": 100 * float(result.kept_after_prefill.sum()) / full_tokens,
            "cache MB": result.bytes_after_prefill / 2**20,
            "decode tok/s": result.tokens_per_second,
            "answer": answer.strip(),
        })
    return rows
