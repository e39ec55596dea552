"""H3, attention entropy by layer (``kvlab profile entropy``).

Claim (the premise of dense early layers, as in PyramidKV, Cai et al. 2024, arXiv 2406.02069, and
DuoAttention-style layer splits): early layers attend broadly (high normalized entropy) and resist
compression; after some boundary layer entropy drops. Measured as the normalized entropy
``H(p) / log(n_visible)`` of the last observed queries per layer and head, over real code and prose at
several lengths, on both built-in model families. The boundary is the change point of the per-layer
mean (:func:`kvlab.experiments.metrics.boundary_layer`), computed per prompt to judge its stability.

The profile written here, ``$KVLAB_CACHE/profiles/<model>-entropy.json``, is what
``block-route --dense-layers auto`` reads: ``{"model", "dense_layers": [...], "boundary", ...}``
(its name and its reader live in :mod:`kvlab.files`, where the routers can reach them).

``kvlab profile entropy`` prints :func:`summarize_cells` of one model's profile cells; ``kvlab validate``
runs :func:`run` (this model and the others on the same texts) and reports :func:`summarize`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError
from kvlab.experiments.locality import profile_cells, profile_pools
from kvlab.experiments.metrics import boundary_layer, mean
from kvlab.experiments.runner import TextPool
from kvlab.experiments.study import Config, Study, check_context
from kvlab.files import entropy_profile_path
from kvlab.io import write_atomic

MIN_DROP = 0.05  # a boundary needs the mean entropy to drop by at least this much


def profile_path(model_name: str) -> Path:
    """Where the entropy profile of ``model_name`` lives: the path ``dense_layers=auto`` reads
    (:func:`kvlab.files.entropy_profile_path`)."""
    return entropy_profile_path(model_name)


def load_profile(model_name: str) -> dict[str, Any] | None:
    path = profile_path(model_name)
    return json.loads(path.read_text()) if path.is_file() else None


def summarize_cells(cells: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """Per-layer entropy (mean over heads, kinds, lengths), per-prompt boundaries, the stable boundary."""
    n_layers = len(cells[0]["layers"])
    sliding = cells[0].get("sliding", [False] * n_layers)
    per_layer = [sum(mean(c["layers"][i]["entropy"]) for c in cells) / len(cells) for i in range(n_layers)]
    per_head = [[sum(c["layers"][i]["entropy"][h] for c in cells) / len(cells)
                 for h in range(len(cells[0]["layers"][i]["entropy"]))] for i in range(n_layers)]
    prompts = []
    for c in cells:
        series = [mean(layer["entropy"]) for layer in c["layers"]]
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


# ----------------------------------------------------------------------------- kvlab validate
def other_models(model_name: str, cfg: Config) -> list[str]:
    """The other models H3 profiles: the config's list, or every other built-in model."""
    from kvlab.models.builtin import BUILTIN_MODELS

    if isinstance(cfg.h3_models, list):
        return [m for m in cfg.h3_models if m != model_name]
    if model_name not in BUILTIN_MODELS:
        return []
    return [m for m in BUILTIN_MODELS if m != model_name]


def run(study: Study) -> dict[str, Any]:
    """H3's profiles: the main model's over the first prefill stage (H3 does not wait for the long prefill),
    written for block-route ``dense_layers=auto`` over all those lengths; then every other model's on the same
    texts at ``other_model_lengths``, compared with the main model's at the lengths they share. A model that
    cannot run here is noted and skipped."""
    import kvlab

    cfg, name = study.cfg, study.model_name
    data = profile_pools(study.stages[0], study.cells, name)
    main_all = summarize_cells(data, name)
    paths = [str(save_profile(main_all))]  # block-route dense_layers=auto: every length
    if study.other_model == "auto":
        others = other_models(name, cfg)
    else:
        others = [study.other_model] if study.other_model else []
    lengths = [x for x in cfg.other_model_lengths if x in study.stage_lengths[0]] if others else []
    shared = [c for c in data if c["length"] in lengths]
    summaries = [summarize_cells(shared, name) if shared else main_all]
    for other in others if cfg.other_model_lengths else []:
        try:
            m2, t2 = kvlab.load(other)
            for length in cfg.other_model_lengths:
                check_context(m2, other, length, len(cfg.kinds))
            # the same number of tokens drawn per text: the same texts (identical ids for a shared tokenizer)
            pool2 = TextPool(m2, t2, cfg.kinds, cfg.other_model_lengths, cfg.seed, total=study.pools[0].total)
            summaries.append(summarize_cells(profile_cells(pool2, study.cells, other), other))
            paths.append(str(save_profile(summaries[-1])))
            del m2, pool2
        except KVLabError as exc:
            study.notes.append(f"H3 on {other} skipped: {exc}")
    return {"models": summaries, "profiles": paths,
            "main_all_lengths": main_all if shared and len(shared) < len(data) else None}


def summarize(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """H3's section from one profile summary per model on the same prompts and lengths (the main model's
    first); ``main_all_lengths``: the main model's profile over all its lengths, when those are more than the
    shared ones."""
    summaries, paths, main_all = data["models"], data["profiles"], data["main_all_lengths"]
    v = verdict(summaries)
    text = v["summary"] + "; dense layers: " + "; ".join(f"{s['model']} {s['dense_layers']}" for s in summaries)
    sizes = compare(summaries)
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
                           f"at least {MIN_DROP}); stable when ≥ 75% of prompts put it within ±1 layer. "
                           f"Profiles written for block-route dense_layers=auto: {', '.join(paths)}.",
            "text": text}
