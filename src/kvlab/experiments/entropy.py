"""H3, attention entropy by layer (``kvlab profile entropy``).

Claim (the premise of dense early layers, as in PyramidKV, Cai et al. 2024, arXiv 2406.02069, and
DuoAttention-style layer splits): early layers attend broadly (high normalized entropy) and resist
compression; after some boundary layer entropy drops. Measured as the normalized entropy
``H(p) / log(n_visible)`` of the last observed queries per layer and head, over real code and prose at
several lengths, on both built-in model families. The boundary is the change point of the per-layer
mean (:func:`kvlab.experiments.metrics.boundary_layer`), computed per prompt to judge its stability.

The profile written here, ``$KVLAB_CACHE/profiles/<model>-entropy.json``, is what
``block-route --dense-layers auto`` reads: ``{"model", "dense_layers": [...], "boundary", ...}``
(its name and its reader live in :mod:`kvlab.models.profiles`, where the routers can reach them).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kvlab.experiments.metrics import boundary_layer
from kvlab.io import write_atomic
from kvlab.models.profiles import entropy_profile_path

MIN_DROP = 0.05  # a boundary needs the mean entropy to drop by at least this much


def profile_path(model_name: str) -> Path:
    """Where the entropy profile of ``model_name`` lives: the path ``dense_layers=auto`` reads
    (:func:`kvlab.models.profiles.entropy_profile_path`)."""
    return entropy_profile_path(model_name)


def load_profile(model_name: str) -> dict[str, Any] | None:
    path = profile_path(model_name)
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(cells: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """Per-layer entropy (mean over heads, kinds, lengths), per-prompt boundaries, the stable boundary."""
    n_layers = len(cells[0]["layers"])
    sliding = cells[0].get("sliding", [False] * n_layers)
    per_layer = [sum(_mean(c["layers"][i]["entropy"]) for c in cells) / len(cells) for i in range(n_layers)]
    per_head = [[sum(c["layers"][i]["entropy"][h] for c in cells) / len(cells)
                 for h in range(len(cells[0]["layers"][i]["entropy"]))] for i in range(n_layers)]
    prompts = []
    for c in cells:
        series = [_mean(layer["entropy"]) for layer in c["layers"]]
        b, drop = boundary_layer(series)
        prompts.append({"kind": c["kind"], "length": c["length"], "boundary": b, "drop": drop})
    boundary, drop = boundary_layer(per_layer)
    counts = Counter(p["boundary"] for p in prompts)
    agree = sum(v for k, v in counts.items() if abs(k - boundary) <= 1) / len(prompts)
    found = drop >= MIN_DROP
    stable = found and agree >= 0.75
    dense = list(range(boundary)) if found else []
    return {
        "model": model_name, "n_layers": n_layers, "entropy_per_layer": per_layer, "entropy_per_head": per_head,
        "sliding_layers": [i for i, s in enumerate(sliding) if s], "boundary": boundary if found else 0,
        "drop": drop, "prompt_boundaries": prompts, "agreement": agree, "stable": stable,
        "dense_layers": dense, "relative_boundary": boundary / n_layers if found else 0.0,
    }


def save_profile(summary: dict[str, Any]) -> Path:
    """Write the profile ``block-route --dense-layers auto`` reads; returns its path."""
    path = profile_path(summary["model"])
    payload = {k: summary[k] for k in ("model", "dense_layers", "boundary", "drop", "stable", "agreement",
                                       "entropy_per_layer", "n_layers")}
    payload["source"] = "kvlab profile entropy (normalized attention entropy of the last prefill queries)"
    write_atomic(path, json.dumps(payload, indent=2))
    return path


def verdict(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """H3 across models: a stable boundary in each, and agreement of relative boundaries across families."""
    if not summaries:
        return {"verdict": "inconclusive", "summary": "no model profiled"}
    parts = [f"{s['model']}: boundary after layer {s['boundary'] - 1 if s['boundary'] else '-'} "
             f"(drop {s['drop']:.3f}, {100 * s['agreement']:.0f}% of prompts within ±1 layer)" for s in summaries]
    stable = all(s["stable"] for s in summaries)
    if len(summaries) >= 2:
        rel = [s["relative_boundary"] for s in summaries]
        across = max(rel) - min(rel) <= 0.15
        parts.append(f"relative boundaries {', '.join(f'{r:.2f}' for r in rel)} "
                     f"({'agree' if across else 'disagree'} within 0.15 of depth)")
        v = "supported" if stable and across else ("not supported" if not any(s["stable"] for s in summaries)
                                                    else "inconclusive")
    else:
        parts.append("only one model family profiled")
        v = "inconclusive" if stable else "not supported"
    return {"verdict": v, "summary": "; ".join(parts)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def on_relative_depth(per_layer: list[float], points: int = 25) -> list[float]:
    """A per-layer series resampled (linearly) at ``points`` relative depths 0..1, to compare models of
    different depth."""
    n = len(per_layer)
    out = []
    for i in range(points):
        x = i / (points - 1) * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        out.append(per_layer[lo] + (x - lo) * (per_layer[hi] - per_layer[lo]))
    return out


def compare(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first model's entropy profile against each other one's over relative depth: Pearson correlation,
    mean absolute difference, and where each profile is lowest (relative depth)."""
    from kvlab.experiments.metrics import pearson

    if len(summaries) < 2:
        return None
    base = summaries[0]
    a = on_relative_depth(base["entropy_per_layer"])
    rows, parts = [], []
    for s in summaries[1:]:
        b = on_relative_depth(s["entropy_per_layer"])
        corr = pearson(a, b)
        diff = sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)
        low = [min(range(len(e)), key=e.__getitem__) / max(1, len(e) - 1)
               for e in (base["entropy_per_layer"], s["entropy_per_layer"])]
        rows.append({"model": s["model"], "correlation": corr, "mean_abs_diff": diff, "lowest_at": low})
        parts.append(f"{base['model']} vs {s['model']}: correlation {'n/a' if corr is None else f'{corr:.2f}'}, "
                     f"mean |Δ| {diff:.3f}, lowest entropy at relative depth {low[0]:.2f} vs {low[1]:.2f}")
    return {"rows": rows, "summary": "; ".join(parts)}
