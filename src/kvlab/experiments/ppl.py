"""Perplexity vs compression (``kvlab eval ppl``).

Teacher-forced perplexity of the continuation of long real texts (Gutenberg prose, stdlib code): the
context is prefilled once, each method compresses a copy (prefill-time eviction) and/or routes every
step (decode-time selection), then the next ``n_tokens`` tokens of the text are forced one step at a
time through the method. The first forced token is scored from the uncompressed prefill logits, so it
is left out: every scored token saw the method at work.
"""

from __future__ import annotations

import math
from typing import Any

from kvlab.experiments.locality import TextPool
from kvlab.experiments.runner import Cells, MethodSpec, run_method
from kvlab.progress import track


def run(pool: TextPool, model_name: str, specs: list[MethodSpec], budgets: list[float], lengths: list[int],
        n_tokens: int, cells: Cells, notes: list[str]) -> list[dict[str, Any]]:
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
                res = run_method(pool.model, snap, s.make(budget), forced, 0, label=f"ppl {s.label} {budget:g}")
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


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
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
