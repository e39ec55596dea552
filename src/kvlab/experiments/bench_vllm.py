"""``kvlab bench vllm``: decode speed of vanilla vLLM against vLLM + kvlab block-route, with a needle.

Two engines, one after the other, on the same model directory and prompts: vLLM with ``{"kvlab":
{"method": "full"}}`` (the plugin inert: vLLM's own attention) and vLLM with block-route at the given
budget. Each case is ``batch`` sequences of ``context`` tokens: real prose (Gutenberg) with a pass-key
needle (Mohtashami & Jaggi 2023, arXiv 2305.16300) and the question at the end; each sequence has its
own text and key.

Decode tokens/s per sequence come from vLLM's own per-request timestamps (``first_token_ts`` ..
``last_token_ts``, engine monotonic clock): ``(tokens - 1) / (last - first)``, averaged over the batch.
To keep prefill out of that window, every case is sent twice: once for one token (the prefill, which
vLLM's prefix cache keeps) and once for ``new_tokens`` tokens, whose prefill is only the prompt's last
partial page. Prompts of one sequence share their first tokens across contexts (the needle sits in the
first 8K tokens, the longer contexts append text after it), so the prefix cache also saves most of
the longer prefills -- on 2 cores prefill is most of the run.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.experiments.niah import INTRO, correct, needle
from kvlab.experiments.texts import build_prompt, encode, text_tokens
from kvlab.machine import describe

DEFAULT_CASES = ((8192, 1), (8192, 4), (16384, 1), (16384, 4), (32768, 1))
NEEDLE_AT = 2048  # tokens of text before the needle (inside the first 8K of every context)
ANSWER_TOKENS = 8  # the needle is judged on the first tokens of the answer


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"8k:1,16k:4"`` -> ``[(8192, 1), (16384, 4)]``."""
    out = []
    for part in text.split(","):
        ctx, _, batch = part.strip().lower().partition(":")
        try:
            tokens = int(float(ctx.rstrip("k")) * (1024 if ctx.endswith("k") else 1))
            n = int(batch or 1)
        except ValueError:
            raise KVLabError(f"--contexts takes CONTEXT:BATCH pairs like 8k:1,16k:4, got {part!r}") from None
        check(tokens >= 4096 and n >= 1, f"a case needs a context of at least 4k tokens and a batch >= 1, got {part!r}")
        out.append((tokens, n))
    return out


def build_prompts(tokenizer: Any, cases: list[tuple[int, int]], max_len: int, new_tokens: int,
                  seed: int = 0, needle_at: int = NEEDLE_AT) -> dict[tuple[int, int], tuple[list[int], str]]:
    """``(context, sequence) -> (prompt ids, gold key)``; a context is capped at ``max_len - new_tokens``; the
    needle follows ``needle_at`` tokens of text."""
    longest = max(ctx for ctx, _ in cases)
    batch = max(b for _, b in cases)
    out = {}
    for i in range(batch):
        text, question, gold = needle("passkey", random.Random(f"bench-vllm-{seed}-{i}"))
        needle_ids = encode(tokenizer, "\n" + text + "\n")
        hay = text_tokens(tokenizer, "prose", longest, seed=seed + 101 * i)
        probe = build_prompt(tokenizer, [(INTRO, False), (needle_ids, True)], question, gold)
        for ctx, _ in cases:
            length = min(ctx, max_len - new_tokens)
            n_hay = length - len(probe.ids)
            segs = [(INTRO, False), (hay[:needle_at], False), (needle_ids, True), (hay[needle_at:n_hay], False)]
            out[(ctx, i)] = (build_prompt(tokenizer, segs, question, gold).ids, gold)
    return out


def _engine(directory: Path, section: dict[str, Any], dtype: str, max_len: int, page_size: int = 128) -> Any:
    from vllm import LLM

    return LLM(model=str(directory), dtype=dtype, max_model_len=max_len, block_size=page_size,
               additional_config=section, enable_prefix_caching=True, disable_log_stats=False, max_num_seqs=8, seed=0)


def run_engine(directory: Path, section: dict[str, Any], prompts: dict, cases: list[tuple[int, int]],
               new_tokens: int, dtype: str, max_len: int, page_size: int = 128) -> list[dict[str, Any]]:
    """One engine, every case: prefill (cached), then ``new_tokens`` greedy tokens per sequence."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = _engine(directory, section, dtype, max_len, page_size)
    startup = time.perf_counter() - start
    rows = []
    try:
        for ctx, batch in sorted(cases, key=lambda c: (c[0], -c[1])):  # batch 4 first: batch 1 reuses its prefill
            batch_prompts = [TokensPrompt(prompt_token_ids=prompts[(ctx, i)][0]) for i in range(batch)]
            t0 = time.perf_counter()
            llm.generate(batch_prompts, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
            prefill_s = time.perf_counter() - t0
            params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            outs = llm.generate(batch_prompts, params, use_tqdm=False)
            rates, answered = [], 0
            for i, out in enumerate(outs):
                m = out.metrics
                n = len(out.outputs[0].token_ids)
                check(m is not None and m.last_token_ts > m.first_token_ts,
                      "vLLM returned no per-request timestamps (log stats off?)")
                rates.append((n - 1) / (m.last_token_ts - m.first_token_ts))
                answer = llm.get_tokenizer().decode(out.outputs[0].token_ids[:ANSWER_TOKENS])
                answered += correct(answer, prompts[(ctx, i)][1])
            rows.append({"context": ctx, "prompt_tokens": len(prompts[(ctx, 0)][0]), "batch": batch,
                         "decode_tok_s_per_seq": sum(rates) / len(rates), "needle": f"{answered}/{batch}",
                         "prefill_s": prefill_s})
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return [dict(r, startup_s=startup) for r in rows]


def run(directory: Path, served: str, section: dict[str, Any], cases: list[tuple[int, int]], new_tokens: int = 32,
        dtype: str = "bfloat16", kv_cache_gib: int = 4, page_size: int = 128) -> dict[str, Any]:
    """Both engines over every case, both on ``page_size``-token pages; the result holds both row sets and
    their speed ratios."""
    from transformers import AutoTokenizer

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    import json

    config = json.loads((directory / "config.json").read_text())
    max_len = int(config.get("max_position_embeddings", 32768))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    prompts = build_prompts(tokenizer, cases, max_len, new_tokens)
    vanilla = run_engine(directory, {"kvlab": {"method": "full"}}, prompts, cases, new_tokens, dtype, max_len,
                         page_size)
    routed = run_engine(directory, section, prompts, cases, new_tokens, dtype, max_len, page_size)
    rows = []
    for v, r in zip(vanilla, routed, strict=True):
        rows.append({"context": v["context"], "prompt_tokens": v["prompt_tokens"], "batch": v["batch"],
                     "vanilla_tok_s": v["decode_tok_s_per_seq"], "block_route_tok_s": r["decode_tok_s_per_seq"],
                     "speedup": r["decode_tok_s_per_seq"] / v["decode_tok_s_per_seq"],
                     "vanilla_needle": v["needle"], "block_route_needle": r["needle"],
                     "vanilla_prefill_s": v["prefill_s"], "block_route_prefill_s": r["prefill_s"]})
    import vllm

    return {"model": served, "dtype": dtype, "machine": describe(), "vllm": vllm.__version__,
            "kvlab": section["kvlab"], "new_tokens": new_tokens, "kv_cache_gib": kv_cache_gib, "page_size": page_size,
            "engine_startup_s": {"vanilla": vanilla[0]["startup_s"], "block_route": routed[0]["startup_s"]},
            "rows": rows}


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"context": f"{r['context'] // 1024}K", "batch": r["batch"], "vanilla tok/s": r["vanilla_tok_s"],
             "block-route tok/s": r["block_route_tok_s"], "speedup": r["speedup"],
             "needle vanilla": r["vanilla_needle"], "needle block-route": r["block_route_needle"]}
            for r in result["rows"]]


def title(result: dict[str, Any]) -> str:
    budget = result["kvlab"].get("budget")
    return (f"vLLM {result['vllm']} decode tok/s per sequence · {result['model']} {result['dtype']} · block-route "
            f"budget {budget} · pages of {result.get('page_size', 128)} · {result['machine']}")
