"""RULER through lm-eval (``kvlab eval ruler``): the benchmark kvpress's leaderboard ranks KV-compression
methods on (Hsieh et al. 2024, arXiv 2404.06654), its samples and scoring taken from lm-eval 0.4.13.

The six RULER tasks lm-eval builds without a download are generated once per (tokenizer, length) with
lm-eval's own generators and saved (:func:`load_samples`); every engine answers those same samples and
every answer is scored by the task's own ``process_results`` (:func:`score`).

A sample is lm-eval's completion prompt (``input`` + " " + ``gen_prefix``). Its question is the last line
of ``input`` (RULER's templates end in one) with the answer prefix: :func:`split` cuts there, so an engine can
compress the context before it reads the question (*question-agnostic*, kvpress's leaderboard) or with it
(*question-aware*, as in serving).

Engines: ``kvlab`` (this module: prefill each sample once, every method from the snapshot, both modes),
``vllm`` (:mod:`kvlab.experiments.ruler_vllm`: ``kvlab serve`` per method, lm-eval's ``local-completions``
client) and ``kvpress`` (:mod:`kvlab.experiments.ruler_kvpress`: kvpress's own pipeline, question-agnostic).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.experiments.runner import Cells, MethodSpec, hook_kind, run_method, truncate
from kvlab.generation import decode_texts, eos_ids, prefill
from kvlab.io import write_atomic
from kvlab.methods.base import Method
from kvlab.progress import track

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
NEEDS_DOWNLOAD = {  # lm-eval's other RULER tasks fetch their data over HTTP
    **{t: "Paul Graham essays" for t in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                                         "niah_multiquery")},
    "ruler_qa_squad": "SQuAD", "ruler_qa_hotpot": "HotpotQA",
}
RATIOS = (0.25, 0.5, 0.75, 0.875)  # kvpress's leaderboard
MODES = ("aware", "agnostic")
ENGINES = ("kvlab", "vllm", "kvpress")
SAMPLES_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One RULER sample: lm-eval's document and the prompt it sends; ``question_at`` is the character where the
    question starts (the context is ``prompt[:question_at]``)."""

    task: str
    index: int
    prompt: str
    question_at: int
    doc: dict[str, Any]
    max_new_tokens: int  # the task's max_gen_toks
    scorer: str  # "module:function", the task's process_results

    @property
    def context(self) -> str:
        return self.prompt[:self.question_at]

    @property
    def question(self) -> str:
        return self.prompt[self.question_at:]

    @property
    def key(self) -> str:
        return f"{self.task}/{self.index}"


def check_tasks(tasks: list[str]) -> list[str]:
    """``tasks`` validated: the six local tasks; one that needs a download, or an unknown one, is refused."""
    for t in tasks:
        if t in NEEDS_DOWNLOAD:
            raise KVLabError(f"RULER task {t!r} downloads {NEEDS_DOWNLOAD[t]}, which this machine cannot; "
                             f"allowed: {', '.join(TASKS)}")
        check(t in TASKS, f"unknown RULER task {t!r}; allowed: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def split(prompt: str, gen_prefix: str) -> int:
    """Where the question starts: the last newline of the input (before the answer prefix)."""
    body = prompt[:len(prompt) - len(gen_prefix)] if gen_prefix and prompt.endswith(gen_prefix) else prompt
    at = body.rstrip().rfind("\n")
    check(at > 0, "a RULER prompt with no newline before its question")
    return at


# ----------------------------------------------------------------------------- samples
def generate(tokenizer_dir: str, tasks: list[str], length: int, n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of each task at ``length`` tokens, built by lm-eval's generators (offline). They
    draw from Python's and NumPy's global generators, seeded here with ``seed`` so that a run can be repeated."""
    import random

    import numpy as np
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval's generators print; stdout is for tables and JSON
            from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise KVLabError("RULER needs lm-eval: pip install 'lm-eval[api]==0.4.13' wonderwords "
                         "(make installs it)") from exc
    manager = TaskManager(metadata={"max_seq_lengths": [length], "tokenizer": tokenizer_dir,
                                    "pretrained": tokenizer_dir})
    out = []
    for name in track(tasks, "RULER samples"):
        random.seed(seed)
        np.random.seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):
            task = manager.load([name])["tasks"][name]
        fn = task.config.process_results
        scorer = f"{fn.__module__}:{fn.__qualname__}"
        task.build_all_requests(limit=n, rank=0, world_size=1)
        for inst in task.instances:
            prompt, gen = inst.args
            doc = {k: v for k, v in inst.doc.items()}
            out.append(Sample(task=name, index=int(inst.doc_id), prompt=prompt,
                              question_at=split(prompt, doc.get("gen_prefix", "")), doc=doc,
                              max_new_tokens=int(gen.get("max_gen_toks", 128)), scorer=scorer))
    return out


def load_samples(path: Path, tokenizer_dir: str, tasks: list[str], length: int, n: int) -> list[Sample]:
    """The first ``n`` samples of each task: read from ``path``, and any that are missing generated and added
    there (atomically), so every engine answers the same ones. Saved samples are never replaced (the cells
    beside them hold their answers): a task extended past what is saved gets only the new indices, and a file
    made for another tokenizer or length is refused."""
    meta = {"version": SAMPLES_VERSION, "tokenizer": Path(tokenizer_dir).name, "length": length}  # not the path:
    # the saved samples stay valid on a machine whose $KVLAB_CACHE is elsewhere
    saved = json.loads(path.read_text()) if path.is_file() else {"meta": meta, "samples": []}
    check(saved.get("meta") == meta, f"{path} holds RULER samples for {saved.get('meta')}, not {meta}; "
                                     "use another --out")
    have = [Sample(**s) for s in saved["samples"]]
    short = [t for t in tasks if sum(s.task == t for s in have) < n]
    if short:
        held = {s.key for s in have}
        have += [s for s in generate(tokenizer_dir, short, length, n) if s.key not in held]
        write_atomic(path, json.dumps({"meta": meta, "samples": [asdict(s) for s in have]}))
    return [s for t in tasks for s in sorted((x for x in have if x.task == t), key=lambda x: x.index)[:n]]


def score(sample: Sample, answer: str) -> float:
    """lm-eval's own score of ``answer`` (the task's ``process_results``; RULER: the share of the reference
    strings found in the answer)."""
    module, name = sample.scorer.split(":")
    fn = getattr(importlib.import_module(module), name)
    metrics = fn(sample.doc, [answer])
    return float(metrics[str(sample.doc["max_length"])])


def token_split(tokenizer: Any, sample: Sample) -> tuple[list[int], int]:
    """The prompt's token ids (as a server tokenizes it) and the number of them that belong to the context."""
    enc = tokenizer(sample.prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    ctx_end = sum(1 for _, end in enc["offset_mapping"] if end <= sample.question_at)  # specials: (0, 0)
    return ids, max(1, min(len(ids) - 1, ctx_end))


# ----------------------------------------------------------------------------- cells
def cell_key(engine: str, model: str, sample: Sample, label: str, ratio: float, mode: str, length: int,
             max_new: int) -> dict[str, Any]:
    return {"engine": engine, "model": model, "task": sample.task, "index": sample.index, "method": label,
            "ratio": ratio, "mode": mode, "length": length, "max_new": max_new}


def new_tokens(sample: Sample, cap: int | None) -> int:
    return sample.max_new_tokens if cap is None else min(cap, sample.max_new_tokens)


def plan(specs: list[MethodSpec], ratios: list[float], modes: list[str]) -> list[tuple[MethodSpec, float, str]]:
    """Every (method, ratio, mode) to run: a budgetless method once at ratio 0; the question-agnostic mode only
    for methods that change the cache. A router selects per step, with the question, in either mode: it runs
    once, question-aware, whichever modes were asked (so ``--mode agnostic`` is kvpress's leaderboard with the
    routers in it)."""
    out = []
    for s in specs:
        for ratio in ([0.0] if s.budgetless else ratios):
            for mode in modes:
                if mode == "agnostic" and s.name != "full" and hook_kind(s.make(1.0 - ratio)) != "eviction":
                    mode = "aware"
                if (s, ratio, mode) not in out:
                    out.append((s, ratio, mode))
    return out


def question_chunk(method: Method) -> int:
    """Forced question tokens per step: all at once (as a prefill chunk) unless the method evicts during decode,
    which takes one token per step."""
    return 1 if method.evicts_during_decode() else 1024


def order(samples: list[Sample]) -> list[Sample]:
    """Sample 0 of every task, then sample 1, ...: a run stopped early still covers every task evenly."""
    return sorted(samples, key=lambda s: (s.index, TASKS.index(s.task)))


def run_kvlab(model: Any, tokenizer: Any, model_name: str, samples: list[Sample], specs: list[MethodSpec],
              ratios: list[float], modes: list[str], cells: Cells, notes: list[str], length: int,
              max_new: int | None = None) -> list[dict[str, Any]]:
    """kvlab's own engine: each sample prefilled once (the question's start captured), then every method from
    that snapshot, question-aware (the whole prompt prefilled and compressed) and question-agnostic (the
    context compressed, then the question forced through the method)."""
    eos = eos_ids(tokenizer, model)
    work = plan(specs, ratios, modes)
    out = []
    for sample in track(order(samples), f"RULER kvlab {model_name}"):
        ids, ctx_end = token_split(tokenizer, sample)
        n_new = new_tokens(sample, max_new)
        keys = [cell_key("kvlab", model_name, sample, s.label, r, m, length, n_new) for s, r, m in work]
        snap = None
        for (s, ratio, mode), key in zip(work, keys, strict=True):
            cell = cells.get("ruler", key)
            if cell is None:
                if snap is None:
                    snap = prefill(model, [ids[:-1]], capture=[ctx_end], chunk_size=1024,
                                   reserve_tokens=len(ids) - ctx_end + n_new, label=f"prefill {sample.key}")
                base, forced = (snap, [ids[-1:]]) if mode == "aware" else (truncate(snap, ctx_end), [ids[ctx_end:]])
                method = s.make(1.0 - ratio)
                try:
                    res = run_method(model, base, method, forced, n_new, eos, forced_chunk=question_chunk(method),
                                     label=f"{sample.key} {s.label} {ratio:g} {mode}")
                except KVLabError as exc:  # a method that cannot run this cell: noted, not fatal
                    notes.append(f"{s.label} at ratio {ratio:g} ({mode}) failed on {sample.key}: {exc}")
                    continue
                answer = decode_texts(tokenizer, res.generated, eos)[0]
                cell = cells.put("ruler", key, {**key, "answer": answer, "score": score(sample, answer),
                                                "seconds": res.seconds + res.compress_seconds})
            out.append(cell)
    return out


# ----------------------------------------------------------------------------- tables
def interval(scores: list[float]) -> float:
    """Half-width of a 95% normal interval of the mean of ``scores`` (0 for fewer than two)."""
    n = len(scores)
    if n < 2:
        return 0.0
    mean = sum(scores) / n
    var = sum((x - mean) ** 2 for x in scores) / (n - 1)
    return 1.96 * math.sqrt(var / n)


def _row_name(c: dict[str, Any]) -> tuple[str, str, str]:
    return c["engine"], c["method"], c["mode"]


def leaderboard(cells: list[dict[str, Any]], ratios: list[float]) -> list[dict[str, Any]]:
    """One row per (engine, method, mode): the mean score over tasks (each task's mean over its samples) at ratio 0
    (the full cache, a budgetless method) and each of ``ratios``; the full cache is the top row of each engine."""
    table: dict[tuple[str, str, str], dict[float, dict[str, list[float]]]] = {}
    for c in cells:
        table.setdefault(_row_name(c), {}).setdefault(c["ratio"], {}).setdefault(c["task"], []).append(c["score"])
    rows = []
    for (engine, method, mode), by_ratio in table.items():
        row: dict[str, Any] = {"engine": engine, "method": method, "mode": mode}
        for r in [0.0, *ratios]:  # every row has every column (0: a budgetless method), None where not run
            tasks = by_ratio.get(r)
            row[f"{r:g}"] = None if not tasks else 100 * sum(sum(v) / len(v) for v in tasks.values()) / len(tasks)
        row["samples"] = max(sum(len(v) for v in t.values()) for t in by_ratio.values())  # per ratio
        rows.append(row)
    rows.sort(key=lambda r: (r["engine"], r["method"] != "full", r["mode"], r["method"]))
    return rows


def per_task(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score (×100) and its 95% interval per (engine, method, mode, ratio, task)."""
    groups: dict[tuple, list[float]] = {}
    for c in cells:
        groups.setdefault((*_row_name(c), c["ratio"], c["task"]), []).append(c["score"])
    return [{"engine": e, "method": m, "mode": mode, "ratio": r, "task": t, "score": 100 * sum(v) / len(v),
             "ci95": 100 * interval(v), "n": len(v)} for (e, m, mode, r, t), v in sorted(groups.items())]


def agreement(cells: list[dict[str, Any]], a: str, b: str) -> list[dict[str, Any]]:
    """Engines ``a`` and ``b`` on the same samples, per (method, ratio, mode): samples both ran, samples whose
    score differs, samples with the very same answer text, and the mean score difference with its 95% interval
    (paired)."""
    by: dict[tuple, dict[str, dict[str, dict[str, Any]]]] = {}
    for c in cells:
        if c["engine"] in (a, b):
            by.setdefault((c["method"], c["ratio"], c["mode"]), {}).setdefault(c["engine"], {})[
                f"{c['task']}/{c['index']}"] = c
    rows = []
    for (method, ratio, mode), engines in sorted(by.items()):
        shared = sorted(set(engines.get(a, {})) & set(engines.get(b, {})))
        if not shared:
            continue
        diff = [engines[a][k]["score"] - engines[b][k]["score"] for k in shared]
        mean = sum(diff) / len(diff)
        ci = interval(diff)
        same = sum(engines[a][k].get("answer", "").strip() == engines[b][k].get("answer", "").strip() for k in shared)
        rows.append({"method": method, "ratio": ratio, "mode": mode, "samples": len(shared),
                     "differ": sum(d != 0 for d in diff), "same answer": same, f"{a} - {b}": 100 * mean,
                     "ci95": 100 * ci, "agree": abs(mean) <= ci or all(d == 0 for d in diff)})
    return rows


def plot(cells: list[dict[str, Any]], ratios: list[float], path: Path, title: str) -> Path:
    """Mean score over tasks against compression ratio, one line per method, one panel per (engine, mode): the
    shape of kvpress's leaderboard plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = leaderboard(cells, ratios)
    panels = list(dict.fromkeys((r["engine"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharex=True,
                             sharey=True)
    names = sorted({r["method"] for r in rows if r["method"] != "full"})
    color = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}  # a method's color in every panel
    for ax, (engine, mode) in zip(axes[0], panels, strict=True):
        fulls = [r for r in rows if r["engine"] == engine and r["method"] == "full"]
        full = next((r for r in fulls if r["mode"] == mode), fulls[0] if fulls else None)
        for r in rows:
            if r["engine"] != engine or r["mode"] != mode or r["method"] == "full":
                continue
            xs = [x for x in ratios if r.get(f"{x:g}") is not None]
            ax.plot([0.0] + xs if full else xs, ([full["0"]] if full else []) + [r[f"{x:g}"] for x in xs],
                    marker="o", label=r["method"], color=color[r["method"]])
        if full:
            ax.axhline(full["0"], color="black", linestyle="--", linewidth=1, label="full")
        ax.set_title(f"{engine} · question-{mode}")
        ax.set_xlabel("compression ratio (fraction removed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("RULER score (mean of tasks, %)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any], ratios: list[float], plot_name: str | None = "ruler.png") -> str:
    """The run's report (``report.md`` beside ``ruler.json``): the leaderboard, the per-task scores with their
    intervals, the engines' agreement and the plot."""

    def table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
        def fmt(v: Any) -> str:
            return "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

        return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                *["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]]

    ratio_cols = [f"{r:g}" for r in ratios]
    lines = [f"# RULER {result['length']} · {result['model']}", "",
             f"Machine: {result['machine']}. Score ×100 (lm-eval's `string_match_all`), the mean of the tasks' means, "
             "per compression ratio (0: the full cache).", "",
             *table(result["leaderboard"], ["engine", "method", "mode", "0", *ratio_cols, "samples"]), ""]
    if plot_name:
        lines += [f"![score against compression ratio]({plot_name})", ""]
    pivot: dict[tuple, dict[str, Any]] = {}
    for r in result["per_task"]:
        row = pivot.setdefault((r["engine"], r["method"], r["mode"], r["task"]),
                               {"engine": r["engine"], "method": r["method"], "mode": r["mode"], "task": r["task"]})
        row[f"{r['ratio']:g}"] = f"{r['score']:.0f} ± {r['ci95']:.0f} ({r['n']})"
    lines += ["## Per task (score ×100 ± 95% interval (samples), per compression ratio)", "",
              *table(list(pivot.values()), ["engine", "method", "mode", "task", "0", *ratio_cols]), ""]
    for name, rows in result["agreement"].items():
        if rows:
            diff = next(k for k in rows[0] if " - " in k)
            lines += [f"## Agreement {name} (paired, same samples)", "",
                      *table([{**r, "ratio": f"{r['ratio']:g}"} for r in rows],
                             ["method", "ratio", "mode", "samples", "differ", "same answer", diff, "ci95", "agree"]),
                      ""]
    return "\n".join(lines)
