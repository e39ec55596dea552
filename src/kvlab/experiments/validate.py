"""``kvlab validate``: run every experiment on a model and write the report.

Each experiment's cells are cached as JSON under ``OUT/cells/``, so an interrupted run resumes where it
stopped; ``OUT/meta.json`` names the model, and an output directory holding another model's results is
refused. Before a context is prefilled its memory is estimated, and a context beyond the model's limit
or beyond the machine's memory is refused with the estimate. Contexts are prefilled once and every
method decodes from the same snapshot.

``--quick`` (``make demo``) is sized for 15 minutes on 2 CPU cores with qwen2.5-coder-0.5b: contexts of
1K/2K/4K, a handful of needle cells, short decodes. ``--full`` is the sweep the issue asks for, sized
to finish in about 1.5 hours on 2 CPU cores (5522 s for qwen2.5-coder-0.5b; docs/results.md). A model
that needs its own sizing has it in ``MODEL_CONFIGS`` (qwen2.5-coder-1.5b: about 2.5 hours, sized from its
measured prefill and decode times; docs/validate-1.5b/README.md). ``OUT/progress.json`` is rewritten after
every section, so a long run's finished sections can be read while it goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import KVLabError, check
from kvlab.experiments import access, entropy, locality, niah, ppl, report, synthetic
from kvlab.experiments.runner import Cells, MethodSpec, resolve, run_method
from kvlab.io import write_atomic

MIN_PPL_TOKENS = 200  # fewer scored tokens per method than this: perplexity differences are noise
EXPERIMENTS = ("h1", "h3", "h2", "niah", "ppl", "synthetic")
QUICK_METHODS = ["full", "block-route", "cluster-route", "oracle-tokens", "streaming", "snapkv", "kv-compress", "h2o"]
E2E_METHODS = ["full", "block-route", "cluster-route", "cluster-route+relayout"]


@dataclass
class Config:
    """What one validation run measures."""

    profile_lengths: list[int]
    kinds: list[str]
    access_contexts: list[int]
    access_reps: int
    e2e_budget: float
    e2e_steps: int
    niah_lengths: list[int]
    niah_depths: list[float]
    niah_kinds: list[str]
    niah_budgets: list[float]
    ppl_lengths: list[int]
    ppl_tokens: int
    ppl_budgets: list[float]
    synthetic_length: int
    synthetic_ratios: list[float]
    synthetic_per_task: int
    methods: list[str] | None  # None: every registered method
    # cluster-route+relayout reads exactly what cluster-route reads (only the memory layout differs), so its
    # accuracy is cluster-route's; H2's end-to-end timing runs it
    exclude: list[str] = field(default_factory=list)
    # The methods set by their own parameters (low-rank, quantize, local-global, cross-layer) in the needle
    # sweep too; False leaves them to perplexity and the synthetic tasks.
    fixed_in_niah: bool = True
    other_model_lengths: list[int] = field(default_factory=list)  # H3 on the other built-in family
    niah_new_tokens: int = 6  # a 5-digit pass key is 5 tokens (digits are single tokens) + end of turn
    synthetic_new_tokens: int = 6
    seed: int = 0
    # Where a model needs its own sizing (a larger model on the same 2 cores):
    order: list[str] = field(default_factory=lambda: list(EXPERIMENTS))  # the sections run (in this order)
    synthetic_focus: dict[str, int] = field(default_factory=dict)  # extra instances of the families it can do
    synthetic_batch: int = 0  # prompts per prefill (0: all at once)
    synthetic_methods: list[str] | None = None  # None: ``methods``
    niah_methods: list[str] | None = None
    ppl_methods: list[str] | None = None
    h3_models: list[str] | str = "auto"  # the other models profiled for H3; "auto": every other built-in one
    # H3 across sizes compares every model on ``other_model_lengths``; the main model's full profile (all of
    # ``profile_lengths``) is reported beside it.
    consensus_model: str | None = None  # a second model run on the same synthetic prompts (consensus by layer)
    consensus_methods: list[str] = field(default_factory=list)
    consensus_ratios: list[float] = field(default_factory=list)
    ppl_from_profile: bool = False  # continue the profile texts for perplexity (no prefill of its own)
    pool_per_kind: bool = False  # prefill each text on its own (batch 1): half the peak memory at long contexts
    profile_stages: list[list[int]] = field(default_factory=list)  # profile_lengths in prefill stages (see below)


QUICK = Config(
    profile_lengths=[1024, 2048, 4096], kinds=["prose", "code"], access_contexts=[4096, 16384, 32768], access_reps=5,
    e2e_budget=0.125, e2e_steps=8, niah_lengths=[1024, 2048], niah_depths=[0.1, 0.5, 0.9], niah_kinds=["passkey"],
    niah_budgets=[0.125], ppl_lengths=[2048], ppl_tokens=16, ppl_budgets=[0.125], synthetic_length=768,
    synthetic_ratios=[0.5, 0.9], synthetic_per_task=1, methods=QUICK_METHODS, other_model_lengths=[1024, 2048],
    h3_models=["qwen2.5-coder-0.5b", "gemma3-270m"],
)
FULL = Config(
    profile_lengths=[4096, 8192, 16384], kinds=["prose", "code"], access_contexts=[4096, 8192, 16384, 32768, 65536],
    access_reps=7, e2e_budget=0.125, e2e_steps=16, niah_lengths=[2048, 4096, 8192], niah_new_tokens=7,
    niah_depths=[0.0, 0.25, 0.5, 0.75, 1.0], niah_kinds=["passkey", "sentence"],
    niah_budgets=[0.5, 0.125, 0.03125], ppl_lengths=[4096], ppl_tokens=101,
    ppl_budgets=[0.25, 0.0625], synthetic_length=1024, synthetic_ratios=[0.1, 0.3, 0.5, 0.7, 0.8, 0.9],
    synthetic_per_task=2, methods=None, exclude=["cluster-route+relayout"], other_model_lengths=[2048, 4096, 8192],
    synthetic_new_tokens=10,
    fixed_in_niah=False,  # the run in docs/results.md had passed its needle sweep when they joined
    h3_models=["qwen2.5-coder-0.5b", "gemma3-270m"],
)
# qwen2.5-coder-1.5b: 3.6× the 0.5B model's non-embedding weights, so --full is sized from its own measured
# prefill and decode times (docs/validate-1.5b/README.md) to finish in about 2.5 hours on 2 cores.
FULL_1_5B = Config(
    profile_lengths=[4096, 8192, 16384, 32768], kinds=["prose", "code"], pool_per_kind=True,
    profile_stages=[[4096, 8192], [16384, 32768]],  # H3 (4K/8K) decided before the two 32K prefills
    access_contexts=[4096, 16384, 65536], access_reps=5, e2e_budget=0.125, e2e_steps=8,
    niah_lengths=[8192], niah_new_tokens=7, niah_depths=[0.25, 0.75], niah_kinds=["passkey"],
    niah_budgets=[0.125, 0.03125], niah_methods=["full", "block-route", "cluster-route", "kv-compress", "snapkv"],
    ppl_lengths=[4096], ppl_tokens=101, ppl_budgets=[0.25], ppl_methods=["full", "block-route", "cluster-route"],
    ppl_from_profile=True,
    synthetic_length=1024, synthetic_ratios=[0.1, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95], synthetic_per_task=2,
    synthetic_focus={"instance/s2a": 14, "tracking/s2a": 14, "coref/s2a": 8}, synthetic_batch=32,
    synthetic_methods=["full", "block-route", "cluster-route", "kv-compress", "snapkv", "streaming"],
    synthetic_new_tokens=6, methods=None, exclude=["cluster-route+relayout"], fixed_in_niah=False,
    other_model_lengths=[4096, 8192], h3_models=["qwen2.5-coder-0.5b", "gemma3-270m"],
    consensus_model="qwen2.5-coder-0.5b", consensus_methods=["block-route", "cluster-route", "kv-compress", "snapkv"],
    consensus_ratios=[0.5, 0.9],
    # H2 is left out: the access benchmark does not depend on the model (a GPU decides it), and its end-to-end
    # decode at 32K would cost minutes for nothing new; `--only h2` runs it.
    order=["synthetic", "h3", "ppl", "niah", "h1"],
)
CONFIGS = {"quick": QUICK, "full": FULL}
MODEL_CONFIGS = {("qwen2.5-coder-1.5b", "full"): FULL_1_5B}


def config_for(model_name: str, mode: str) -> Config:
    """The sizing of ``mode`` for ``model_name``: its own where one is measured, else the mode's."""
    check(mode in CONFIGS, f"unknown mode {mode!r}; allowed: {', '.join(CONFIGS)}")
    return MODEL_CONFIGS.get((model_name, mode), CONFIGS[mode])


# ----------------------------------------------------------------------------- guards
def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number where unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def estimate_memory(model: Any, context: int, batch: int = 1, chunk: int = 1024, copies: int = 3) -> int:
    """Bytes a prefill of ``batch × context`` tokens needs: the weights, the KV store ``copies`` times
    (snapshot, a method's copy, a repack), and the attention scores of one chunk over the context."""
    cfg = model.config
    elt = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elt * context * batch
    # torch's CPU SDPA with a bool mask: the mask (1 byte) and about 2 more bytes per score held at once
    # (measured: 2.3 GB more peak memory for a [2, 12, 1024, 32768] call); 5 bytes leaves a margin
    scores = batch * cfg.num_attention_heads * min(chunk, context) * context * (1 + 4)
    return weights + copies * kv + scores + (256 << 20)


def check_context(model: Any, model_name: str, context: int, batch: int = 1, copies: int = 3) -> None:
    """Refuse a context beyond the model's limit or beyond memory, with the estimate."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise KVLabError(f"context of {context} tokens exceeds {model_name}'s limit of {limit} tokens")
    need, have = estimate_memory(model, context, batch, copies=copies), available_memory()
    if need > 0.85 * have:
        raise KVLabError(f"context of {context} tokens × {batch} needs about {need / 2**30:.1f} GiB "
                         f"(weights + KV cache ×3 + attention scores) but only {have / 2**30:.1f} GiB is available")


def claim_out_dir(out: Path, model_name: str, mode: str) -> None:
    """Create ``out`` for ``model_name``, or refuse one that holds another model's results."""
    meta = out / "meta.json"
    if meta.is_file():
        try:
            held = json.loads(meta.read_text()).get("model")
        except json.JSONDecodeError:
            held = None
        if held is not None and held != model_name:
            raise KVLabError(f"output directory {out} holds results of model {held!r}, not {model_name!r}; "
                             f"use another --out")
    elif out.exists() and any(out.iterdir()):
        check((out / "cells").is_dir() or not any(p.suffix == ".json" for p in out.iterdir()),
              f"output directory {out} holds other files; use an empty or new --out")
    write_atomic(meta, json.dumps({"model": model_name, "mode": mode}))


# ----------------------------------------------------------------------------- sections
def profile_all(pools: list[locality.TextPool], cells: Cells, model_name: str) -> list[dict[str, Any]]:
    """Profile cells of every pool; each pool is profiled (and its cells cached) before the next is prefilled."""
    return [c for p in pools for c in locality.profile_cells(p, cells, model_name)]


def section_h1(pools: list[locality.TextPool], cells: Cells, model_name: str) -> dict[str, Any]:
    data = profile_all(pools, cells, model_name)
    pool = pools[0]
    kinds = [k for p in pools for k in p.kinds]
    s = locality.summarize(data)
    longest = max(c["length"] for c in data)
    grid, labels = locality.heatmap(data, longest)
    return {"verdict": s["verdict"], "summary": s, "cells": data,
            "heatmap": {"grid": grid, "labels": labels, "length": longest},
            "measurement": f"Exact softmax attention of the last 64 prefill queries over the stored keys, per layer "
                           f"and query head, for {', '.join(kinds)} at {', '.join(map(str, pool.lengths))} "
                           f"tokens; sink = first {s.get('sink_tokens')} tokens, local = the last "
                           f"{s.get('local_tokens')} tokens before each query. Supported when ε < 0.05 in at least "
                           f"75% of layers, not supported below 50%.",
            "text": s["summary"] + f"; overall {100 * s.get('fraction_layers_below', 0):.0f}% of layers"}


def section_h3(summaries: list[dict[str, Any]], paths: list[str], main_all: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """H3 from one summary per model on the same prompts and lengths (the main model's first); ``main_all``:
    the main model's profile over all its lengths, when those are more than the shared ones."""
    v = entropy.verdict(summaries)
    text = v["summary"] + "; dense layers: " + "; ".join(f"{s['model']} {s['dense_layers']}" for s in summaries)
    sizes = entropy.compare(summaries)
    if sizes:
        text += "; profiles over relative depth: " + sizes["summary"]
    if main_all is not None:
        text += (f"; {main_all['model']} over all its lengths: boundary after layer "
                 f"{main_all['boundary'] - 1 if main_all['boundary'] else '-'} (drop {main_all['drop']:.3f}, "
                 f"{100 * main_all['agreement']:.0f}% of prompts within ±1 layer)")
    return {"verdict": v["verdict"], "models": summaries, "profiles": paths, "main_all_lengths": main_all,
            "compare": sizes,
            "measurement": "Normalized entropy H(p)/log(n) of the last 64 prefill queries per layer and head over "
                           "real code and prose (the same texts for every model; the two Qwen sizes share a tokenizer, "
                           "so their prompts are identical); boundary = change point of the per-layer mean (a drop of "
                           f"at least {entropy.MIN_DROP}); stable when ≥ 75% of prompts put it within ±1 layer. "
                           f"Profiles written for block-route dense_layers=auto: {', '.join(paths)}.",
            "text": text}


def run_e2e(pool: locality.TextPool, cells: Cells, model_name: str, budget: float, steps: int,
            notes: list[str]) -> dict[str, Any]:
    length = pool.lengths[-1]
    specs = resolve(E2E_METHODS, notes, budget)
    rows = []
    for s in specs:
        key = {"model": model_name, "method": s.label, "budget": budget, "steps": steps, "length": length}
        cell = cells.get("e2e", key)
        if cell is None:
            snap, _ = pool.at(length)
            try:
                res = run_method(pool.model, snap, s.make(budget), None, steps + 1, label=f"e2e {s.label}")
            except Exception as exc:
                notes.append(f"e2e: {s.label} failed: {exc}")
                continue
            batch = snap.context_lengths.shape[0]
            cell = cells.put("e2e", key, {"method": s.label, "seconds": res.seconds, "steps": res.steps,
                                          "compress_seconds": res.compress_seconds,
                                          "tokens_per_second": res.steps * batch / res.seconds})
        rows.append(cell)
    return {"rows": rows, "budget": budget, "context": length, "batch": len(pool.kinds)}


def section_h2(benches: list[dict[str, Any]], e2e: dict[str, Any]) -> dict[str, Any]:
    """H2 from the access benchmarks (the CPU's first; GPU ones measured here or given with
    ``--access-result``) and the end-to-end decode. The claim is about GPUs: a GPU bench, when there is
    one, gives the verdict, and the CPU's is reported beside it."""
    sums = [access.summarize(b) for b in benches]
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


def section_niah(data: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    s = niah.summarize(data)
    acc = {(r["method"], r["mode"], r["budget"]): r["accuracy"] for r in s["rows"]}
    heatmaps = []
    for b in sorted({c["budget"] for c in data if c["method"] != "full"}, reverse=True):
        panels = []
        for m, mode in dict.fromkeys((c["method"], c["mode"]) for c in data):
            if (m == "full") or any(c["budget"] == b and c["method"] == m and c["mode"] == mode for c in data):
                bb = 1.0 if m == "full" else b
                d, lens, grid = niah.heat(data, m, mode, bb)
                if grid:
                    panels.append({"title": f"{m}{'' if mode == 'aware' else ' (agnostic)'}", "depths": d,
                                   "lengths": lens, "grid": grid})
        heatmaps.append({"budget": b, "panels": panels})
    parts, verdicts = [], []
    for b in sorted({r["budget"] for r in s["rows"] if r["method"] != "full"}, reverse=True):
        br, cr = acc.get(("block-route", "aware", b)), acc.get(("cluster-route", "aware", b))
        if br is not None and cr is not None:
            parts.append(f"budget {b:g}: block-route {100 * br:.0f}% vs cluster-route {100 * cr:.0f}%")
            verdicts.append(br - cr)
    if not verdicts or (s["full_accuracy"] or 0) < 0.5:
        v = "inconclusive"  # no comparison, or a task the model fails even with the full cache
        parts.append(f"full-cache accuracy {100 * (s['full_accuracy'] or 0):.0f}%: too low to judge" if verdicts else
                     "block-route and cluster-route not both run")
    elif all(d >= -0.1 for d in verdicts):
        v = "supported"
    elif all(d < -0.1 for d in verdicts):
        v = "not supported"
    else:
        v = "inconclusive"
    return {"verdict": v, "summary": s, "heatmaps": heatmaps, "cells": data,
            "measurement": f"Needles ({', '.join(cfg.niah_kinds)}) at depths {cfg.niah_depths} of Gutenberg prose, "
                           f"contexts {cfg.niah_lengths}, budgets {cfg.niah_budgets}; an answer is correct when it "
                           "contains the needle's key. Tested claim: position-aware block-route keeps up with "
                           "similarity-aware cluster-route on retrieval (supported when within 10 points at every "
                           "budget).",
            "text": "; ".join(parts) + ("; " if parts else "") + s["summary"]}


def section_ppl(data: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    s = ppl.summarize(data)
    by = {(r["method"], r["budget"]): r["ppl"] for r in s["rows"]}
    cmp_ = [(b, by[("block-route", b)], by[("cluster-route", b)]) for b in cfg.ppl_budgets
            if ("block-route", b) in by and ("cluster-route", b) in by]
    scored = sum(c["tokens"] * len(c["nll"]) for c in data if c["method"] == "full")
    if not cmp_ or scored < MIN_PPL_TOKENS:
        v = "inconclusive"  # no comparison, or too few scored tokens to separate methods
    else:
        v = "supported" if all(br <= 1.05 * cr for _, br, cr in cmp_) else "not supported"
    text = "; ".join(f"budget {b:g}: block-route {br:.2f} vs cluster-route {cr:.2f}" for b, br, cr in cmp_)
    text = f"{scored} scored tokens per method{' (too few to judge)' if scored < MIN_PPL_TOKENS else ''}; " + text
    return {"verdict": v, "summary": s, "cells": data,
            "measurement": f"Teacher-forced perplexity of the next {cfg.ppl_tokens - 1} tokens after "
                           f"{cfg.ppl_lengths} tokens of {', '.join(cfg.kinds)}, every step through the method "
                           "(the first forced token, scored by the prefill logits, is left out). Tested claim: "
                           "block-route's perplexity is within 5% of cluster-route's at equal budget (judged only "
                           f"with at least {MIN_PPL_TOKENS} scored tokens per method).",
            "text": (text + "; " if text else "") + s["summary"]}


MIN_SOLVED = 30  # questions the full cache must answer before a cliff in conditional accuracy means anything
NEAR_90 = (0.85, 0.95)  # "a cliff near 90% compression" (arXiv 2603.01426)


def cliff_tracks_ger(curve: dict[str, Any]) -> bool:
    """A cliff tracks GER when GER and conditional accuracy correlate below -0.5 over the ratios and the
    GER spike is within one step of the swept grid of the cliff."""
    c, spike, x = curve["cliff"], curve["ger_spike"], curve["ratios"]
    if c is None or spike is None or curve["correlation"] is None:
        return False
    return curve["correlation"] < -0.5 and abs(x.index(spike) - x.index(c)) <= 1


def section_synthetic(data: list[dict[str, Any]], cfg: Config,
                      consensus: dict[str, Any] | None = None) -> dict[str, Any]:
    s = synthetic.summarize(data)
    rows = [r for r in s["rows"] if r["method"] != "full"]
    corr = _pearson([r["ger"] for r in rows], [r["f1"] for r in rows])
    top, low = max(cfg.synthetic_ratios), min(cfg.synthetic_ratios)
    h_top = _mean([r["hallucination"] for r in rows if r["ratio"] == top])
    h_low = _mean([r["hallucination"] for r in rows if r["ratio"] == low])
    curves = s["curves"]
    near = [m for m, c in curves.items() if c["cliff"] is not None and NEAR_90[0] <= c["cliff"] <= NEAR_90[1]]
    tracks = [m for m, c in curves.items() if cliff_tracks_ger(c)]
    n = max(1, len(curves))
    if s["solved"] < MIN_SOLVED or not curves:
        v = "inconclusive"  # too few questions the model can answer even with the full cache
        why = f"the full cache answers {s['solved']} questions, fewer than the {MIN_SOLVED} a cliff needs"
    elif len(near) >= 2 * n / 3 and len(tracks) >= 2 * n / 3:
        v, why = "supported", "most swept methods have their cliff near 90% and it tracks a GER spike"
    elif len(near) <= n / 3 or len(tracks) <= n / 3:
        v = "not supported"
        why = (f"the cliff sits near 90% for {len(near)}/{len(curves)} methods and tracks a GER spike for "
               f"{len(tracks)}/{len(curves)}")
    else:
        v, why = "inconclusive", "the methods disagree"
    text = (f"{why}; near 90%: {', '.join(near) or 'none'}; tracking GER: {', '.join(tracks) or 'none'}; "
            f"hallucination rate {h_low:.2f} at ratio {low:g} → {h_top:.2f} at {top:g}; correlation of mean GER with "
            f"F1 across all (method, ratio) cells {'n/a' if corr is None else f'{corr:.2f}'}; "
            + (f"families the model cannot do (full cache < {synthetic.CAN_DO:.0%}): {', '.join(s['cannot'])}; "
               if s["cannot"] else "") + s["summary"])
    if consensus:
        text += "; head consensus by layer: " + consensus["summary"]
    return {"verdict": v, "summary": s, "cells": data, "near_90": near, "tracks_ger": tracks,
            "consensus_compare": consensus,
            "measurement": _synthetic_measurement(cfg),
            "text": text}


def _synthetic_measurement(cfg: Config) -> str:
    focus = ", ".join(cfg.synthetic_focus) or "no family"
    return (f"Template tasks from a seed (tracking, instance disambiguation, coreference with unanswerable questions, "
            f"2–4-hop chains; both directions; {cfg.synthetic_per_task} instances per task plus more of {focus}) in "
            f"{cfg.synthetic_length}-token contexts of Gutenberg filler, ratios {cfg.synthetic_ratios}. Correct = "
            "token F1 ≥ 0.5; conditional accuracy = accuracy on the questions the full cache answers; the cliff = "
            "the first ratio where it falls below half of the full cache's. GER and head consensus are measured on "
            "what each (layer, KV head) reads at the step that produces the first answer token. Supported when, for "
            f"at least 2/3 of the swept methods, the cliff lies in {NEAR_90[0]:.0%}–{NEAR_90[1]:.0%} and tracks GER "
            "(correlation < -0.5 over the ratios, GER spike within one grid step); judged only when the full cache "
            f"answers at least {MIN_SOLVED} questions.")


def consensus_compare(models: dict[str, list[dict[str, Any]]], methods: list[str],
                      ratios: list[float]) -> dict[str, Any]:
    """Head consensus by layer per model on the same questions (the ids every model answered), per
    (method, ratio), and each profile's shape: "early consensus" or "funnel" (late convergence)."""
    qids = None
    for cells in models.values():
        ids = {r["qid"] for c in cells for r in c["rows"]}
        qids = ids if qids is None else qids & ids
    out: dict[str, Any] = {"models": {}, "questions": len(qids or ())}
    parts = []
    for name, cells in models.items():
        prof = {}
        for c in cells:
            if c["method"] in methods and c["ratio"] in ratios:
                rs = [r for r in c["rows"] if r["qid"] in (qids or ())]
                if rs:
                    n_layers = len(rs[0]["consensus_per_layer"])
                    per_layer = [sum(r["consensus_per_layer"][i] for r in rs) / len(rs) for i in range(n_layers)]
                    shape = synthetic.consensus_shape(per_layer)
                    prof[f"{c['method']}@{c['ratio']:g}"] = {"per_layer": per_layer, **shape}
        out["models"][name] = prof
        shapes = [f"{k} {v['shape']} ({v['early']:.2f} → {v['late']:.2f})" for k, v in prof.items()]
        parts.append(f"{name}: " + ", ".join(shapes))
    out["summary"] = f"on {out['questions']} shared questions, first → last third of layers: " + "; ".join(parts)
    return out


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    mx, my = _mean(x), _mean(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=False)) / (sx * sy)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def conclusion(ex: dict[str, Any]) -> list[str]:
    v = {k: ex[k]["verdict"] for k in ex if isinstance(ex[k], dict) and "verdict" in ex[k]}
    out = ["Verdicts: " + ", ".join(f"{k.upper() if k.startswith('h') else k} {val}" for k, val in v.items()) + "."]
    if "h2" in ex:
        e2e = {r["method"]: r["tokens_per_second"] for r in ex["h2"].get("e2e", {}).get("rows", [])}
        gaps = [f"{b.get('machine', b['device'])} {s['gaps'][-1]['gap']:.2f}× at {s['gaps'][-1]['context']} tokens"
                for b, s in zip(ex["h2"]["bench"], ex["h2"]["bench_summary"], strict=True) if s["gaps"]]
        if "block-route" in e2e and "cluster-route" in e2e:
            out.append(f"Speed: block-route decodes at {e2e['block-route']:.2f} tok/s vs cluster-route "
                       f"{e2e['cluster-route']:.2f} and full {e2e.get('full', float('nan')):.2f} on this model "
                       f"(CPU); a scattered read costs, over the best contiguous one: {'; '.join(gaps)}.")
    # NIAH and PPL test that block-route keeps up with cluster-route: "supported" is a win for the bet
    wins = [k for k in ("h1", "h2", "niah", "ppl") if v.get(k) == "supported"]
    fails = [k for k in ("h1", "h2", "niah", "ppl", "synthetic") if v.get(k) == "not supported"]
    out.append("The position-aware bet holds where: " + (", ".join(wins) if wins else "none of the tests run here")
               + ". It fails or is not shown where: " + (", ".join(fails) if fails else "no test clearly refuted it")
               + "; inconclusive results are listed above with their numbers.")
    return out


# ----------------------------------------------------------------------------- orchestration
def run_validate(model_name: str, out: Path, mode: str = "quick", only: list[str] | None = None,
                 config: Config | None = None, model: Any = None, tokenizer: Any = None,
                 other_model: str | None = "auto", device_bench: bool = True,
                 access_results: list[Path] | None = None) -> dict[str, Any]:
    """Run the experiments (``only`` a subset) and write the report into ``out``; returns the results.

    ``access_results``: H2 access benchmarks measured on other machines (``kvlab bench access --json``,
    e.g. on a GPU), added to this run's. ``other_model``: the models H3 also profiles ("auto": the config's
    ``h3_models``, by default every other built-in model; None: none).
    """
    check(mode in CONFIGS, f"unknown mode {mode!r}; allowed: {', '.join(CONFIGS)}")
    bad = [e for e in only or [] if e not in EXPERIMENTS]
    check(not bad, f"unknown experiment {', '.join(bad)}; allowed: {', '.join(EXPERIMENTS)}")
    cfg = config or config_for(model_name, mode)
    only = list(only or cfg.order)
    extra_benches = [load_access_result(p) for p in access_results or []]
    out = Path(out)
    claim_out_dir(out, model_name, mode)
    if model is None:
        import kvlab

        model, tokenizer = kvlab.load(model_name)
    for length in sorted(set(cfg.profile_lengths + cfg.ppl_lengths)):
        # a profile length nothing decodes from holds the snapshot and one truncated copy, not three stores
        profile_only = cfg.pool_per_kind and length not in cfg.ppl_lengths and "h2" not in (only or [])
        check_context(model, model_name, length + (cfg.ppl_tokens if length in cfg.ppl_lengths else 0),
                      1 if cfg.pool_per_kind else len(cfg.kinds), copies=2 if profile_only else 3)
    for length in cfg.niah_lengths:
        check_context(model, model_name, length, len(cfg.niah_depths))
    cells = Cells(out / "cells")
    notes: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    ex: dict[str, Any] = {}
    specs = [s for s in resolve(cfg.methods, notes) if s.label not in cfg.exclude]

    def subset(labels: list[str] | None) -> list[MethodSpec]:
        return specs if labels is None else [s for s in resolve(labels, notes) if s.label not in cfg.exclude]

    # The seeded texts, prefilled once and only when one of their cells is missing. Perplexity continues the
    # profile texts when its lengths are among theirs (one prefill for H1, H3 and perplexity).
    # ``pool_per_kind``: one prefill per text (batch 1), each profiled before the next is prefilled.
    # ``profile_stages``: the lengths in stages, each its own prefill of the same texts (the short points are
    # decided before the long prefill starts); a pool nothing else uses frees its prefill once profiled.
    stages = cfg.profile_stages or [cfg.profile_lengths]
    shared_ppl = cfg.ppl_from_profile and any(set(cfg.ppl_lengths) <= set(st) for st in stages)
    ppl_stage = next((i for i, st in enumerate(stages) if set(cfg.ppl_lengths) <= set(st)), None) if shared_ppl \
        else None
    total = max(cfg.profile_lengths) + (cfg.ppl_tokens + 8 if shared_ppl else 32)
    groups = [[k] for k in cfg.kinds] if cfg.pool_per_kind else [list(cfg.kinds)]
    staged = [[locality.TextPool(model, tokenizer, g, st, cfg.seed, total=total, first_index=cfg.kinds.index(g[0]),
                                 keep=None if not cfg.pool_per_kind and len(stages) == 1
                                 else (max(cfg.ppl_lengths) if i == ppl_stage else 0))
               for g in groups] for i, st in enumerate(stages)]
    pools = [p for st in staged for p in st]
    pool = pools[0]
    ppl_pools = staged[ppl_stage] if ppl_stage is not None else [
        locality.TextPool(model, tokenizer, cfg.kinds, cfg.ppl_lengths, cfg.seed, extra=cfg.ppl_tokens + 8)]

    def step(name: str, fn):
        t, c = time.perf_counter(), time.process_time()
        ex[name] = fn()
        timings[name], cpu_timings[name] = time.perf_counter() - t, time.process_time() - c
        _progress(out, model_name, mode, started, t0, cpu0, timings, cpu_timings, ex)

    def h1() -> dict[str, Any]:
        return section_h1(pools, cells, model_name)

    def h3() -> dict[str, Any]:
        data = profile_all(staged[0], cells, model_name)  # the first stage: H3 does not wait for the long prefill
        main_all = entropy.summarize(data, model_name)
        paths = [str(entropy.save_profile(main_all))]  # block-route dense_layers=auto: every length
        others = _h3_models(model_name, cfg) if other_model == "auto" else ([other_model] if other_model else [])
        lengths = [x for x in cfg.other_model_lengths if x in stages[0]] if others else []
        shared = [c for c in data if c["length"] in lengths]
        summaries = [entropy.summarize(shared, model_name) if shared else main_all]
        for other in others if cfg.other_model_lengths else []:
            try:
                import kvlab

                m2, t2 = kvlab.load(other)
                for length in cfg.other_model_lengths:
                    check_context(m2, other, length, len(cfg.kinds))
                # the same number of tokens drawn per text: the same texts (identical ids for a shared tokenizer)
                pool2 = locality.TextPool(m2, t2, cfg.kinds, cfg.other_model_lengths, cfg.seed, total=pool.total)
                data2 = locality.profile_cells(pool2, cells, other)
                summaries.append(entropy.summarize(data2, other))
                paths.append(str(entropy.save_profile(summaries[-1])))
                del m2, pool2
            except KVLabError as exc:
                notes.append(f"H3 on {other} skipped: {exc}")
        return section_h3(summaries, paths, main_all if shared and len(shared) < len(data) else None)

    def h2() -> dict[str, Any]:
        benches = []
        devices = ["cpu"] + (["cuda"] if device_bench and torch.cuda.is_available() else [])
        for dev in devices:
            key = {"contexts": cfg.access_contexts, "reps": cfg.access_reps, "device": dev,
                   "machine": access.machine()}
            cell = cells.get("access", key)
            if cell is None:
                cell = cells.put("access", key, access.bench_access(cfg.access_contexts, reps=cfg.access_reps,
                                                                    device=dev, seed=cfg.seed))
            benches.append(cell)
        benches.extend(extra_benches)
        e2e = run_e2e(pool, cells, model_name, cfg.e2e_budget, cfg.e2e_steps, notes)
        return section_h2(benches, e2e)

    def niah_() -> dict[str, Any]:
        pool_specs = subset(cfg.niah_methods)
        niah_specs = [s for s in pool_specs if cfg.fixed_in_niah or not s.fixed]
        if len(niah_specs) < len(pool_specs):
            notes.append("niah: the fixed-setting methods (" + ", ".join(s.label for s in pool_specs if s.fixed)
                         + ") are not in this needle sweep (fixed_in_niah=False)")
        return section_niah(niah.run(model, tokenizer, model_name, niah_specs, cfg.niah_lengths, cfg.niah_depths,
                                     cfg.niah_budgets, cfg.niah_kinds, cells, notes, cfg.seed, cfg.niah_new_tokens),
                            cfg)

    def ppl_() -> dict[str, Any]:
        return section_ppl([c for p in ppl_pools for c in ppl.run(p, model_name, subset(cfg.ppl_methods),
                                                                  cfg.ppl_budgets, cfg.ppl_lengths, cfg.ppl_tokens,
                                                                  cells, notes)], cfg)

    def synthetic_() -> dict[str, Any]:
        data = synthetic.run(model, tokenizer, model_name, subset(cfg.synthetic_methods), cfg.synthetic_ratios,
                             cfg.synthetic_length, cells, notes, cfg.seed, cfg.synthetic_per_task,
                             cfg.synthetic_new_tokens, cfg.synthetic_focus, cfg.synthetic_batch)
        compare = None
        if cfg.consensus_model and cfg.consensus_methods:
            try:
                compare = _consensus_run(cfg, data, model_name, cells, notes)
            except KVLabError as exc:
                notes.append(f"consensus on {cfg.consensus_model} skipped: {exc}")
        return section_synthetic(data, cfg, compare)

    sections = {"h1": h1, "h3": h3, "h2": h2, "niah": niah_, "ppl": ppl_, "synthetic": synthetic_}
    for name in [e for e in cfg.order if e in only] + [e for e in only if e not in cfg.order]:
        step(name, sections[name])
    results = _results(model_name, mode, started, t0, cpu0, timings, cpu_timings, ex, cfg, specs, notes)
    results["prefill_seconds"] = {"profile": [p.prefill_seconds for p in pools],
                                  "ppl": [p.prefill_seconds for p in ppl_pools]}
    report.write_report(results, out)
    return results


def _results(model_name: str, mode: str, started: str, t0: float, cpu0: float, timings: dict[str, float],
             cpu_timings: dict[str, float], ex: dict[str, Any], cfg: Config | None = None,
             specs: list[MethodSpec] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    return {
        "model": model_name, "mode": mode, "machine": access.machine(), "started": started,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
        "torch_threads": torch.get_num_threads(), "timings": timings, "cpu_timings": cpu_timings,
        "config": dataclasses.asdict(cfg) if cfg else None, "methods": [s.label for s in specs or []],
        "notes": _dedupe(notes or []), "experiments": ex, "conclusion": conclusion(ex),
    }


def _progress(out: Path, model_name: str, mode: str, started: str, t0: float, cpu0: float,
              timings: dict[str, float], cpu_timings: dict[str, float], ex: dict[str, Any]) -> None:
    """``OUT/progress.json`` after every section: which are done, and their wall and CPU seconds (a long run
    can be followed, and its finished sections read, before the report is written)."""
    done = {k: {"verdict": v.get("verdict"), "text": v.get("text")} for k, v in ex.items() if isinstance(v, dict)}
    write_atomic(out / "progress.json", json.dumps({
        "model": model_name, "mode": mode, "started": started, "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0, "timings": timings, "cpu_timings": cpu_timings,
        "done": done}, indent=2, default=str))


def _consensus_run(cfg: Config, data: list[dict[str, Any]], model_name: str, cells: Cells,
                   notes: list[str]) -> dict[str, Any]:
    """The consensus model on the base synthetic set (the same questions: a shared tokenizer gives identical
    prompts) at ``consensus_ratios``, against the main model's cells on the same question ids."""
    import kvlab

    other = cfg.consensus_model
    assert other is not None
    m2, t2 = kvlab.load(other)
    specs2 = [s for s in resolve(cfg.consensus_methods, notes) if not s.budgetless]
    data2 = synthetic.run(m2, t2, other, specs2, cfg.consensus_ratios, cfg.synthetic_length, cells, notes, cfg.seed,
                          cfg.synthetic_per_task, cfg.synthetic_new_tokens, None, cfg.synthetic_batch)
    del m2
    return consensus_compare({model_name: data, other: data2}, cfg.consensus_methods, cfg.consensus_ratios)


def _h3_models(model_name: str, cfg: Config) -> list[str]:
    """The other models H3 profiles: the config's list, or every other built-in model."""
    from kvlab.models.builtin import BUILTIN_MODELS

    if isinstance(cfg.h3_models, list):
        return [m for m in cfg.h3_models if m != model_name]
    if model_name not in BUILTIN_MODELS:
        return []
    return [m for m in BUILTIN_MODELS if m != model_name]


def _dedupe(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))
