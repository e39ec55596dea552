"""Perplexity vs compression (``kvlab eval ppl``).

Teacher-forced perplexity of the continuation of long real texts (Gutenberg prose, stdlib code): the
context is prefilled once, each method compresses a copy (prefill-time eviction) and/or routes every
step (decode-time selection), then the next ``n_tokens`` tokens of the text are forced one step at a
time through the method. The first forced token is scored from the uncompressed prefill logits, so it
is left out: every scored token saw the method at work.

``kvlab eval ppl`` prints :func:`summarize_cells` of :func:`run_cells`; ``kvlab validate`` runs :func:`run`
and reports :func:`summarize`.
"""

from __future__ import annotations

import math
from typing import Any

from kvlab.experiments.locality import TextPool
from kvlab.experiments.runner import Cells, MethodSpec, run_method
from kvlab.experiments.study import Config, Study
from kvlab.progress import track

MIN_PPL_TOKENS = 200  # fewer scored tokens per method than this: perplexity differences are noise


def run_cells(pool: TextPool, model_name: str, specs: list[MethodSpec], budgets: list[float], lengths: list[int],
              n_tokens: int, cells: Cells, notes: list[str], cuda_graphs: bool = True) -> list[dict[str, Any]]:
    """One cell per (context length, method, budget): NLL per text kind."""
    out = []
    plan = [(length, s, b) for length in lengths for s in specs for b in s.budgets(budgets)]
    for length, s, budget in track(plan, "perplexity"):
        key = {"model": model_name, "length": length, "method": s.label, "budget": budget, "n": n_tokens,
               "kinds": pool.kinds}
        cell = cells.get("ppl", key)
        if cell is None:
            snap, _ = pool.at(length)
            forced = [ids[length:length + n_tokens] for ids in pool.ids]
            try:
                res = run_method(pool.model, snap, s.make(budget), forced, 0, label=f"ppl {s.label} {budget:g}",
                                 cuda_graphs=cuda_graphs)
            except Exception as exc:
                notes.append(f"ppl: {s.label} at budget {budget:g} failed: {exc}")
                continue
            nll = res.forced_nll[:, 1:]
            per_kind = {k: float(nll[i].mean()) for i, k in enumerate(pool.kinds)}
            cell = cells.put("ppl", key, {"model": model_name, "length": length, "method": s.label, "budget": budget,
                                          "nll": per_kind, "ppl": {k: math.exp(v) for k, v in per_kind.items()},
                                          "tokens": int(nll.shape[1]), "seconds": res.seconds})
        out.append(cell)
    return out


def summarize_cells(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Perplexity per (method, budget), averaged over kinds and lengths, relative to the full cache."""
    agg: dict[tuple[str, float], list[float]] = {}
    for c in cells:
        agg.setdefault((c["method"], c["budget"]), []).append(sum(c["nll"].values()) / len(c["nll"]))
    rows = [{"method": m, "budget": b, "ppl": math.exp(sum(v) / len(v))} for (m, b), v in agg.items()]
    full = next((r["ppl"] for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["vs_full"] = r["ppl"] / full if full else None
    rows.sort(key=lambda r: (-r["budget"], r["ppl"]))
    parts = [f"full cache {full:.2f}" if full else "no full-cache baseline"]
    for b in sorted({r["budget"] for r in rows if r["method"] != "full"}, reverse=True):
        sel = [r for r in rows if r["budget"] == b and r["method"] != "full"]
        parts.append(f"budget {b:g}: " + ", ".join(f"{r['method']} {r['ppl']:.2f}" for r in sel))
    return {"rows": rows, "full_ppl": full, "summary": "; ".join(parts)}


# ----------------------------------------------------------------------------- kvlab validate
def run(study: Study) -> dict[str, Any]:
    """Perplexity of ``ppl_methods`` at every budget, continuing the texts of the run's perplexity pools."""
    cfg = study.cfg
    specs = study.methods(cfg.ppl_methods)
    return {"cells": [c for p in study.ppl_pools for c in run_cells(p, study.model_name, specs, cfg.ppl_budgets,
                                                                    cfg.ppl_lengths, cfg.ppl_tokens, study.cells,
                                                                    study.notes, study.cuda_graphs)]}


def summarize(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The perplexity section: perplexity per (method, budget) and the verdict on block-route against
    cluster-route (judged only with :data:`MIN_PPL_TOKENS` scored tokens per method)."""
    cells = data["cells"]
    s = summarize_cells(cells)
    by = {(r["method"], r["budget"]): r["ppl"] for r in s["rows"]}
    cmp_ = [(b, by[("block-route", b)], by[("cluster-route", b)]) for b in cfg.ppl_budgets
            if ("block-route", b) in by and ("cluster-route", b) in by]
    scored = sum(c["tokens"] * len(c["nll"]) for c in cells if c["method"] == "full")
    if not cmp_ or scored < MIN_PPL_TOKENS:
        v = "inconclusive"  # no comparison, or too few scored tokens to separate methods
    else:
        v = "supported" if all(br <= 1.05 * cr for _, br, cr in cmp_) else "not supported"
    text = "; ".join(f"budget {b:g}: block-route {br:.2f} vs cluster-route {cr:.2f}" for b, br, cr in cmp_)
    text = f"{scored} scored tokens per method{' (too few to judge)' if scored < MIN_PPL_TOKENS else ''}; " + text
    return {"verdict": v, "summary": s, "cells": cells,
            "measurement": f"Teacher-forced perplexity of the next {cfg.ppl_tokens - 1} tokens after "
                           f"{cfg.ppl_lengths} tokens of {', '.join(cfg.kinds)}, every step through the method "
                           "(the first forced token, scored by the prefill logits, is left out). Tested claim: "
                           "block-route's perplexity is within 5% of cluster-route's at equal budget (judged only "
                           f"with at least {MIN_PPL_TOKENS} scored tokens per method).",
            "text": (text + "; " if text else "") + s["summary"]}
