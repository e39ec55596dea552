"""``kvlab validate``: run every experiment on a model and write the report.

This module is the configuration (:class:`Config`: what a run measures; :data:`QUICK`, :data:`FULL` and a
model's own sizing in :data:`MODEL_CONFIGS`) and the table of experiments (:data:`EXPERIMENTS`: each an
experiment module's ``run`` and ``summarize``, and the config fields it reads), with the loop that runs
them in the config's order. What the experiments share -- the model, the cell cache, the notes, the
texts prefilled once -- is a :class:`~kvlab.experiments.study.Study`.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import KVLabError, check
from kvlab.experiments import access, entropy, locality, niah, ppl, report, synthetic
from kvlab.experiments.runner import Cells, MethodSpec
from kvlab.experiments.study import Study
from kvlab.io import write_atomic

QUICK_METHODS = ["full", "block-route", "cluster-route", "oracle-tokens", "streaming", "snapkv", "kv-compress", "h2o"]


# ----------------------------------------------------------------------------- the experiments
@dataclass(frozen=True)
class Experiment:
    """One row of the table. ``run(study)`` measures (every cell cached, so a second run resumes) and returns
    its data; ``summarize(data, cfg)`` makes the report's section from that data and the config alone (the
    verdict, the numbers, how it was measured): a section holds its data, so a results.json can be
    summarised again. ``config``: the fields of :class:`Config` it reads, besides :data:`SHARED`."""

    run: Callable[[Study], dict[str, Any]]
    summarize: Callable[[dict[str, Any], Config], dict[str, Any]]
    config: tuple[str, ...]


# What every experiment reads: the methods, the seed, and the texts the profiles and perplexity share.
SHARED = ("methods", "exclude", "seed", "order", "kinds", "profile_lengths", "profile_stages", "pool_per_kind")
EXPERIMENTS: dict[str, Experiment] = {
    "h1": Experiment(locality.run, locality.summarize, ()),
    "h3": Experiment(entropy.run, entropy.summarize, ("other_model_lengths", "h3_models")),
    "h2": Experiment(access.run, access.summarize, ("access_contexts", "access_reps", "e2e_budget", "e2e_steps")),
    "niah": Experiment(niah.run, niah.summarize, ("niah_lengths", "niah_depths", "niah_kinds", "niah_budgets",
                                                  "niah_methods", "niah_new_tokens", "fixed_in_niah")),
    "ppl": Experiment(ppl.run, ppl.summarize, ("ppl_lengths", "ppl_tokens", "ppl_budgets", "ppl_methods",
                                               "ppl_from_profile")),
    "synthetic": Experiment(synthetic.run, synthetic.summarize, (
        "synthetic_length", "synthetic_ratios", "synthetic_per_task", "synthetic_new_tokens", "synthetic_focus",
        "synthetic_batch", "synthetic_methods", "consensus_model", "consensus_methods", "consensus_ratios")),
}


# ----------------------------------------------------------------------------- the configuration
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
    # one prefill per text to 32K (batch 1), capturing 4K/8K/16K/32K on the way: H3 and H1 read the same pools
    profile_lengths=[4096, 8192, 16384, 32768], kinds=["prose", "code"], pool_per_kind=True,
    access_contexts=[4096, 16384, 65536], access_reps=5, e2e_budget=0.125, e2e_steps=8,
    niah_lengths=[8192, 16384], niah_new_tokens=7, niah_depths=[0.25, 0.75], niah_kinds=["passkey"],
    niah_budgets=[0.125, 0.03125], niah_methods=["full", "block-route", "cluster-route", "kv-compress", "snapkv"],
    ppl_lengths=[4096], ppl_tokens=65, ppl_budgets=[0.25], ppl_methods=["full", "block-route", "cluster-route"],
    ppl_from_profile=True,
    # one instance per task plus more of the families the model answers (single facts both ways, tracking
    # forwards), so that the full cache answers 30+ questions: 49 prompts in 2 parts
    synthetic_length=1024, synthetic_ratios=[0.1, 0.5, 0.8, 0.85, 0.9, 0.95], synthetic_per_task=1,
    synthetic_focus={"instance/s2a": 14, "instance/a2s": 14, "tracking/s2a": 8, "coref/s2a": 2}, synthetic_batch=25,
    synthetic_methods=["full", "block-route", "cluster-route", "kv-compress"],
    synthetic_new_tokens=6, methods=None, exclude=["cluster-route+relayout"], fixed_in_niah=False,
    other_model_lengths=[4096, 8192], h3_models=["qwen2.5-coder-0.5b", "gemma3-270m"],
    consensus_model="qwen2.5-coder-0.5b", consensus_methods=["block-route", "cluster-route", "kv-compress"],
    consensus_ratios=[0.5, 0.9],
    # H2 is left out: the access benchmark does not depend on the model (a GPU decides it), and its end-to-end
    # decode at 32K would cost minutes for nothing new; `--only h2` runs it.
    order=["synthetic", "h3", "h1", "ppl", "niah"],
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


def check_contexts(model: Any, model_name: str, cfg: Config, only: list[str]) -> None:
    """Refuse, before anything is prefilled, a profile, perplexity or needle context the model or the
    machine cannot hold."""
    for length in sorted(set(cfg.profile_lengths + cfg.ppl_lengths)):
        # a profile length nothing decodes from holds the snapshot and one truncated copy, not three stores
        profile_only = cfg.pool_per_kind and length not in cfg.ppl_lengths and "h2" not in only
        check_context(model, model_name, length + (cfg.ppl_tokens if length in cfg.ppl_lengths else 0),
                      1 if cfg.pool_per_kind else len(cfg.kinds), copies=2 if profile_only else 3)
    for length in cfg.niah_lengths:
        check_context(model, model_name, length, len(cfg.niah_depths))


# ----------------------------------------------------------------------------- the run
def run_validate(model_name: str, out: Path, mode: str = "quick", only: list[str] | None = None,
                 config: Config | None = None, model: Any = None, tokenizer: Any = None,
                 other_model: str | None = "auto", device_bench: bool = True,
                 access_results: list[Path] | None = None, cuda_graphs: bool = True) -> dict[str, Any]:
    """Run the experiments (``only`` a subset) and write the report into ``out``; returns the results.

    ``access_results``: H2 access benchmarks measured on other machines (``kvlab bench access --json``,
    e.g. on a GPU), added to this run's. ``other_model``: the models H3 also profiles ("auto": the config's
    ``h3_models``, by default every other built-in model; None: none). ``cuda_graphs``: decode's argument
    (on CUDA, decode steps replayed from CUDA graphs; nothing changes on the CPU).
    """
    check(mode in CONFIGS, f"unknown mode {mode!r}; allowed: {', '.join(CONFIGS)}")
    bad = [e for e in only or [] if e not in EXPERIMENTS]
    check(not bad, f"unknown experiment {', '.join(bad)}; allowed: {', '.join(EXPERIMENTS)}")
    cfg = config or config_for(model_name, mode)
    only = list(only or cfg.order)
    extra_benches = [access.load_access_result(p) for p in access_results or []]
    out = Path(out)
    claim_out_dir(out, model_name, mode)
    if model is None:
        import kvlab

        model, tokenizer = kvlab.load(model_name)
    check_contexts(model, model_name, cfg, only)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    ex: dict[str, Any] = {}
    study = Study(model, tokenizer, model_name, cfg, Cells(out / "cells"), other_model=other_model,
                  device_bench=device_bench, extra_benches=extra_benches, cuda_graphs=cuda_graphs)
    for name in [e for e in cfg.order if e in only] + [e for e in only if e not in cfg.order]:
        t, c = time.perf_counter(), time.process_time()
        experiment = EXPERIMENTS[name]
        ex[name] = experiment.summarize(experiment.run(study), cfg)
        timings[name], cpu_timings[name] = time.perf_counter() - t, time.process_time() - c
        _progress(out, model_name, mode, started, t0, cpu0, timings, cpu_timings, ex)
    results = _results(model_name, mode, started, t0, cpu0, timings, cpu_timings, ex, cfg, study.specs, study.notes)
    results["prefill_seconds"] = {"profile": [p.prefill_seconds for p in study.pools],
                                  "ppl": [p.prefill_seconds for p in study.ppl_pools]}
    report.write_report(results, out)
    return results


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


def _dedupe(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))
