"""Uncompressed decode through kvlab's store vs transformers' own DynamicCache + SDPA.

Both decode the same prompt greedily on the same model in one process, alternating in rounds so
that noise on a shared machine hits both; the figure that matters is the ratio of per-step times.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from kvlab.errors import check
from kvlab.generation import decode, left_pad, positions_from_valid, prefill
from kvlab.methods import make_method
from kvlab.progress import track


@torch.inference_mode()
def _hf_steps(model: Any, ids: list[list[int]], steps: int) -> float:
    """Seconds per decode step with DynamicCache + SDPA (prefill excluded)."""
    input_ids, valid = left_pad(ids)
    positions = positions_from_valid(valid)
    mask = valid.long()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, token, pos = out.past_key_values, out.logits[:, -1].argmax(-1), positions[:, -1]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=torch.long)], 1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    return (time.perf_counter() - start) / steps


def run(model: Any, contexts: list[int], batch: int = 1, steps: int = 16, rounds: int = 2,
        vocab_limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Per context length: seconds per decode step for transformers and kvlab ``full``, and their ratio."""
    check(steps >= 2 and rounds >= 1, "steps must be >= 2 and rounds >= 1")
    vocab = vocab_limit or model.config.vocab_size
    rows = []
    for context in track(contexts, "decode benchmark"):
        g = torch.Generator().manual_seed(seed + context)
        ids = [torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(batch)]
        snapshot = prefill(model, ids, reserve_tokens=steps * rounds + 1)
        hf, kv = [], []
        for _ in range(rounds):
            hf.append(_hf_steps(model, ids, steps))
            result = decode(model, snapshot, make_method("full"), max_new_tokens=steps + 1)
            kv.append(result.decode_seconds / result.steps)
        hf_s, kv_s = statistics.median(hf), statistics.median(kv)
        rows.append({"context": context, "batch": batch, "transformers ms/step": 1e3 * hf_s,
                     "kvlab full ms/step": 1e3 * kv_s, "kvlab / transformers": kv_s / hf_s})
    return rows
