"""``kvlab validate``: run every experiment on a model and write the report.

This module is the sizing of a run (:data:`QUICK`, :data:`FULL` and a model's own in :data:`MODEL_CONFIGS`,
each a :class:`~kvlab.experiments.study.Config`) and the table of experiments (:data:`EXPERIMENTS`: each an
experiment module's ``run`` and ``summarize``, and the config fields it reads), with the loop that runs
them in the config's order. What the experiments share -- the configuration, the model, the cell cache, the
notes, the texts prefilled once -- is in :mod:`kvlab.experiments.study`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import KVLabError, check
from kvlab.experiments import access, entropy, locality, niah, ppl, report, synthetic
from kvlab.experiments.runner import Cells, MethodSpec
from kvlab.experiments.study import Config, Study, check_context
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


# ----------------------------------------------------------------------------- the sizing
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
