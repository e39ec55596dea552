"""Needle in a haystack (``kvlab niah``): where a retrieval-heavy task breaks position-aware selection.

A pass key ("The pass key is 73914 ...", after Mohtashami & Jaggi 2023, arXiv 2305.16300) or a sentence
needle is spliced into real prose (Gutenberg) at depths 0–100% of contexts of several lengths, and every
method answers at budgets from 1/2 to 1/32. All depths of a (length, needle) pair share one haystack and
one batch, so each context is prefilled once.

Decode-time routing sees the question (it selects per step, with the question's queries); prefill-time
eviction, as usually evaluated (SnapKV, Li et al. 2024, arXiv 2404.14469), compresses with the question
in its observation window: the *question-aware* mode. Eviction methods also run *question-agnostic*:
compressed right after the context, before the question is read (compress once, ask anything).

``kvlab niah`` prints :func:`summarize_cells` of :func:`run_cells`; ``kvlab validate`` runs :func:`run`
(the config's sweep) and reports :func:`summarize`.
"""

from __future__ import annotations

import random
from typing import Any

from kvlab.experiments import metrics
from kvlab.experiments.runner import (
    Cells,
    MethodSpec,
    hook_kind,
    run_method,
    truncate,
)
from kvlab.experiments.study import Config, Study
from kvlab.experiments.texts import Prompt, build_prompt, encode, text_tokens
from kvlab.generation import decode_texts, eos_ids, prefill
from kvlab.progress import track

KINDS = ("passkey", "sentence")
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white"]
WORDS = ["lantern", "harbor", "velvet", "orchid", "granite", "meadow", "falcon", "cobalt", "saffron", "juniper"]
INTRO = "Read the text below. Somewhere in it is a piece of information you will be asked about.\n\n"


def needle(kind: str, rng: random.Random) -> tuple[str, str, str]:
    """``(needle text, question, gold answer)``."""
    if kind == "passkey":
        key = str(rng.randrange(10000, 100000))
        return (f"The pass key is {key}. Remember it. {key} is the pass key.",
                "What is the pass key? Answer with the number only.", key)
    color, word = rng.choice(COLORS), rng.choice(WORDS)
    return (f"The magic word for the {color} door is {word}.",
            f"What is the magic word for the {color} door? Answer with the word only.", word)


def prompts(tokenizer: Any, length: int, depths: list[float], kind: str, seed: int = 0) -> list[Prompt]:
    """One prompt of exactly ``length`` tokens per depth, same haystack and needle."""
    rng = random.Random(f"{seed}-{length}-{kind}")
    text, question, gold = needle(kind, rng)
    needle_ids = encode(tokenizer, "\n" + text + "\n")
    probe = build_prompt(tokenizer, [(INTRO, False), (needle_ids, True)], question, gold)
    n_hay = length - len(probe.ids)
    if n_hay < 16:
        from kvlab.errors import KVLabError

        raise KVLabError(f"NIAH context of {length} tokens is too short for the needle and question "
                         f"(needs more than {len(probe.ids) + 16})")
    hay = text_tokens(tokenizer, "prose", n_hay, seed)
    out = []
    for depth in depths:
        cut = round(depth * n_hay)
        segs = [(INTRO, False), (hay[:cut], False), (needle_ids, True), (hay[cut:], False)]
        p = build_prompt(tokenizer, segs, question, gold, {"depth": depth, "kind": kind, "length": length})
        assert len(p.ids) == length, (len(p.ids), length)
        out.append(p)
    return out


def correct(answer: str, gold: str) -> bool:
    return metrics.normalize_answer(gold) in metrics.normalize_answer(answer)


def run_cells(model: Any, tokenizer: Any, model_name: str, specs: list[MethodSpec], lengths: list[int],
              depths: list[float], budgets: list[float], kinds: list[str], cells: Cells, notes: list[str],
              seed: int = 0, max_new_tokens: int = 8, agnostic: bool = True,
              cuda_graphs: bool = True) -> list[dict[str, Any]]:
    """Every (length, needle kind, method, budget, mode) cell; each holds all depths. The question-agnostic
    mode is run for the methods that change the cache (at prefill end or per step) rather than choose what
    each step reads (:func:`~kvlab.experiments.runner.hook_kind` ``eviction``)."""
    eos = eos_ids(tokenizer, model)
    out: list[dict[str, Any]] = []
    for length in lengths:
        for kind in kinds:
            batch = prompts(tokenizer, length, depths, kind, seed)
            ctx_end = batch[0].context_end
            plan = []
            for s in specs:
                for budget in s.budgets(budgets):
                    plan.append((s, budget, "aware"))
                    if agnostic and s.name != "full" and hook_kind(s.make(budget)) == "eviction":
                        plan.append((s, budget, "agnostic"))
            keys = [{"model": model_name, "length": length, "kind": kind, "depths": depths, "method": s.label,
                     "budget": b, "mode": mode, "seed": seed, "max_new": max_new_tokens} for s, b, mode in plan]
            cached = [cells.get("niah", k) for k in keys]
            snap = None
            work = list(zip(plan, keys, cached, strict=True))
            for (s, budget, mode), key, cell in track(work, f"niah {length} {kind}"):
                if cell is None:
                    if snap is None:
                        snap = prefill(model, [p.ids[:-1] for p in batch], capture=[ctx_end], chunk_size=1024,
                                       reserve_tokens=len(batch[0].ids) - ctx_end + max_new_tokens,
                                       label=f"niah prefill {length}")
                    try:
                        if mode == "aware":
                            base, forced = snap, [p.ids[-1:] for p in batch]
                        else:
                            base, forced = truncate(snap, ctx_end), [p.ids[ctx_end:] for p in batch]
                        res = run_method(model, base, s.make(budget), forced, max_new_tokens, eos, record_reads=True,
                                         label=f"niah {s.label} {budget:g} {mode}", cuda_graphs=cuda_graphs)
                    except Exception as exc:  # a method that cannot run this cell: noted, not fatal
                        notes.append(f"niah: {s.label} at budget {budget:g} ({mode}) failed: {exc}")
                        continue
                    answers = decode_texts(tokenizer, res.generated, eos)
                    rows = []
                    for b, (p, a) in enumerate(zip(batch, answers, strict=False)):
                        ger = [metrics.global_eviction_ratio(res.reads[i][b], p.relevant) for i in sorted(res.reads)]
                        rows.append({"depth": p.meta["depth"], "answer": a, "correct": correct(a, p.gold),
                                     "ger_per_layer": ger})
                    cell = cells.put("niah", key, {"model": model_name, "length": length, "kind": kind,
                                                   "method": s.label, "budget": budget, "mode": mode, "rows": rows,
                                                   "gold": batch[0].gold, "decode_seconds": res.seconds})
                out.append(cell)
    return out


def summarize_cells(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per (method, mode, budget), and the full-cache baseline."""
    table: dict[tuple[str, str, float], list[bool]] = {}
    for c in cells:
        table.setdefault((c["method"], c["mode"], c["budget"]), []).extend(r["correct"] for r in c["rows"])
    rows = [{"method": m, "mode": mode, "budget": b, "accuracy": sum(v) / len(v), "n": len(v)}
            for (m, mode, b), v in sorted(table.items(), key=lambda x: (x[0][0], x[0][1], -x[0][2]))]
    full = [r["accuracy"] for r in rows if r["method"] == "full"]
    base = full[0] if full else None
    best = {}
    for r in rows:
        if r["method"] != "full":
            best.setdefault(r["budget"], []).append(r)
    parts = [f"full cache {100 * base:.0f}%" if base is not None else "no full-cache baseline"]
    for b in sorted(best, reverse=True):
        ranked = sorted(best[b], key=lambda r: -r["accuracy"])
        parts.append(f"budget {b:g}: " + ", ".join(f"{r['method']}{'' if r['mode'] == 'aware' else ' (agnostic)'} "
                                                   f"{100 * r['accuracy']:.0f}%" for r in ranked[:6]))
    return {"rows": rows, "full_accuracy": base, "summary": "; ".join(parts)}


def heat(cells: list[dict[str, Any]], method: str, mode: str, budget: float) -> tuple[list[float], list[int],
                                                                                       list[list[float]]]:
    """``(depths, lengths, accuracy[depth][length])`` for one method, mode and budget (mean over needles)."""
    sel = [c for c in cells if c["method"] == method and c["mode"] == mode and c["budget"] == budget]
    depths = sorted({r["depth"] for c in sel for r in c["rows"]})
    lengths = sorted({c["length"] for c in sel})
    grid = []
    for d in depths:
        row = []
        for length in lengths:
            v = [r["correct"] for c in sel if c["length"] == length for r in c["rows"] if r["depth"] == d]
            row.append(sum(v) / len(v) if v else float("nan"))
        grid.append(row)
    return depths, lengths, grid


# ----------------------------------------------------------------------------- kvlab validate
def run(study: Study) -> dict[str, Any]:
    """The needle sweep of the config: ``niah_methods`` (the fixed-setting ones only with ``fixed_in_niah``)
    at every length, depth, needle kind and budget."""
    cfg = study.cfg
    pool_specs = study.methods(cfg.niah_methods)
    specs = [s for s in pool_specs if cfg.fixed_in_niah or not s.fixed]
    if len(specs) < len(pool_specs):
        study.notes.append("niah: the fixed-setting methods (" + ", ".join(s.label for s in pool_specs if s.fixed)
                           + ") are not in this needle sweep (fixed_in_niah=False)")
    return {"cells": run_cells(study.model, study.tokenizer, study.model_name, specs, cfg.niah_lengths,
                               cfg.niah_depths, cfg.niah_budgets, cfg.niah_kinds, study.cells, study.notes, cfg.seed,
                               cfg.niah_new_tokens, cuda_graphs=study.cuda_graphs)}


def summarize(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The needle section: accuracy per (method, mode, budget), a depth × length heatmap per budget, and the
    verdict on block-route against cluster-route."""
    cells = data["cells"]
    s = summarize_cells(cells)
    acc = {(r["method"], r["mode"], r["budget"]): r["accuracy"] for r in s["rows"]}
    heatmaps = []
    for b in sorted({c["budget"] for c in cells if c["method"] != "full"}, reverse=True):
        panels = []
        for m, mode in dict.fromkeys((c["method"], c["mode"]) for c in cells):
            if (m == "full") or any(c["budget"] == b and c["method"] == m and c["mode"] == mode for c in cells):
                d, lens, grid = heat(cells, m, mode, 1.0 if m == "full" else b)
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
    return {"verdict": v, "summary": s, "heatmaps": heatmaps, "cells": cells,
            "measurement": f"Needles ({', '.join(cfg.niah_kinds)}) at depths {cfg.niah_depths} of Gutenberg prose, "
                           f"contexts {cfg.niah_lengths}, budgets {cfg.niah_budgets}; an answer is correct when it "
                           "contains the needle's key. Tested claim: position-aware block-route keeps up with "
                           "similarity-aware cluster-route on retrieval (supported when within 10 points at every "
                           "budget).",
            "text": "; ".join(parts) + ("; " if parts else "") + s["summary"]}
