"""H1, attention locality (``kvlab profile locality``).

Claim (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453; the premise of block routing): the queries at
the end of a long context put almost all their attention on the first block (the attention sink) and
a local window, so the rest (ε) can be read sparsely. Measured per layer and query head, for the last
observed queries of real code and prose at several context lengths, from the stored keys and the
observed post-RoPE queries (exact softmax, no eager re-run). Also the mass by log2 distance bucket, as
a layer × distance heatmap. Verdict: in how many layers ε < 0.05.

``kvlab profile locality`` runs :func:`profile_cells` and prints :func:`summarize_cells`; ``kvlab validate``
runs :func:`run` and reports :func:`summarize`. Its texts come from
:class:`~kvlab.experiments.runner.TextPool`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvlab.experiments import metrics
from kvlab.experiments.runner import Cells, TextPool, attention_weights
from kvlab.experiments.study import Config, Study
from kvlab.generation import Captured, Snapshot
from kvlab.progress import track

EPS_THRESHOLD = 0.05


@dataclass
class LayerProfile:
    sink: list[float]  # per query head, mean over observed queries
    local: list[float]
    elsewhere: list[float]
    entropy: list[float]
    buckets: list[float]  # mass per distance bucket, mean over heads and queries


def profile_snapshot(snapshot: Snapshot, captured: Captured, length: int, batch_index: int, sink: int,
                     local: int, n_queries: int = 64) -> list[LayerProfile]:
    """Per-layer attention statistics of the last ``n_queries`` observed queries before ``length``."""
    buckets = metrics.distance_buckets(length)
    out = []
    for layer_idx, layer in enumerate(snapshot.store.layers):
        q = captured.queries[layer_idx][:, :, -n_queries:]
        n = q.shape[2]
        q_pos = torch.arange(length - n, length)
        w, kpos = attention_weights(layer, q, q_pos, snapshot.scaling, batch_index)
        kp = kpos[:, None, :]  # [Hq, 1, T]
        regions = metrics.region_mass(w, kp[:, 0], q_pos, sink, local)
        visible = (kp >= 0) & (kp <= q_pos[None, :, None])
        if layer.sliding_window is not None:
            visible &= (q_pos[None, :, None] - kp) < layer.sliding_window
        ent = metrics.normalized_entropy(w, visible)
        dist = metrics.distance_mass(w, kpos, q_pos, buckets)  # [Hq, L, nb]
        out.append(LayerProfile(
            sink=regions["sink"].mean(1).tolist(), local=regions["local"].mean(1).tolist(),
            elsewhere=regions["elsewhere"].mean(1).tolist(), entropy=ent.mean(1).tolist(),
            buckets=dist.mean((0, 1)).tolist(),
        ))
    return out


def profile_cells(pool: TextPool, cells: Cells, model_name: str, sink: int = 16, local: int = 128,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One cell per (text kind, context length): per-layer sink/local/elsewhere mass, entropy, buckets."""
    out = []
    todo = [(b, kind, length) for length in pool.lengths for b, kind in enumerate(pool.kinds)]
    for b, kind, length in track(todo, "attention profiles"):
        key = {"model": model_name, "kind": kind, "length": length, "sink": sink, "local": local, "seed": seed}
        cell = cells.get("profile", key)
        if cell is None:
            snap, captured = pool.at(length)
            layers = profile_snapshot(snap, captured, length, b, sink, local)
            cell = cells.put("profile", key, {
                "model": model_name, "kind": kind, "length": length, "sink_tokens": sink, "local_tokens": local,
                "buckets": [list(x) for x in metrics.distance_buckets(length)],
                "layers": [vars(x) for x in layers],
                "sliding": [layer.sliding_window is not None for layer in snap.store.layers],
            })
        out.append(cell)
    if pool.keep is not None:
        pool.shrink(pool.keep)
    return out


def profile_pools(pools: list[TextPool], cells: Cells, model_name: str) -> list[dict[str, Any]]:
    """Profile cells of every pool; each pool is profiled (and its cells cached) before the next is prefilled."""
    return [c for p in pools for c in profile_cells(p, cells, model_name)]


def summarize_cells(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per length: ε per layer (mean over heads and kinds), the layers with ε < 0.05, and the verdict."""
    by_length: dict[int, list[dict[str, Any]]] = {}
    for c in cells:
        by_length.setdefault(c["length"], []).append(c)
    rows = []
    for length, group in sorted(by_length.items()):
        n_layers = len(group[0]["layers"])
        eps = [sum(metrics.mean(c["layers"][i]["elsewhere"]) for c in group) / len(group) for i in range(n_layers)]
        sink = [sum(metrics.mean(c["layers"][i]["sink"]) for c in group) / len(group) for i in range(n_layers)]
        local = [sum(metrics.mean(c["layers"][i]["local"]) for c in group) / len(group) for i in range(n_layers)]
        # Head-level: fraction of (layer, head) pairs with ε < threshold.
        heads = [h for c in group for layer in c["layers"] for h in layer["elsewhere"]]
        rows.append({
            "length": length, "eps_per_layer": eps, "sink_per_layer": sink, "local_per_layer": local,
            "layers_eps_below": sum(e < EPS_THRESHOLD for e in eps), "n_layers": n_layers,
            "heads_eps_below_fraction": sum(h < EPS_THRESHOLD for h in heads) / max(1, len(heads)),
            "mean_eps": sum(eps) / n_layers,
        })
    if not rows:
        return {"rows": [], "verdict": "inconclusive", "summary": "no data"}
    frac = sum(r["layers_eps_below"] for r in rows) / sum(r["n_layers"] for r in rows)
    text = "; ".join(f"{r['length']} tokens: ε < {EPS_THRESHOLD} in {r['layers_eps_below']}/{r['n_layers']} layers "
                     f"(mean ε {r['mean_eps']:.3f})" for r in rows)
    kinds = by_kind(cells)
    if len(kinds) > 1:
        text += "; per text: " + "; ".join(
            f"{k} {v['verdict']} (mean ε " + ", ".join(f"{r['mean_eps']:.3f}" for r in v["rows"])
            + f" at {', '.join(str(r['length']) for r in v['rows'])} tokens; ε < {EPS_THRESHOLD} in "
            f"{sum(r['layers_eps_below'] for r in v['rows'])}/{sum(r['n_layers'] for r in v['rows'])} layer-lengths)"
            for k, v in kinds.items())
    return {"rows": rows, "fraction_layers_below": frac, "verdict": _verdict(frac), "summary": text,
            "by_kind": kinds, "sink_tokens": cells[0]["sink_tokens"], "local_tokens": cells[0]["local_tokens"]}


def _verdict(fraction_below: float) -> str:
    return "supported" if fraction_below >= 0.75 else ("not supported" if fraction_below < 0.5 else "inconclusive")


def by_kind(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """ε per text kind (code and prose are not alike: source code is markedly more local): per length, ε per
    layer, the layers with ε < 0.05 and the mean; and the kind's own verdict by the same rule."""
    out = {}
    for kind in dict.fromkeys(c["kind"] for c in cells):
        rows = []
        for c in sorted((c for c in cells if c["kind"] == kind), key=lambda c: c["length"]):
            eps = [metrics.mean(layer["elsewhere"]) for layer in c["layers"]]
            heads = [h for layer in c["layers"] for h in layer["elsewhere"]]
            rows.append({"length": c["length"], "eps_per_layer": eps, "mean_eps": sum(eps) / len(eps),
                         "layers_eps_below": sum(e < EPS_THRESHOLD for e in eps), "n_layers": len(eps),
                         "heads_eps_below_fraction": sum(h < EPS_THRESHOLD for h in heads) / max(1, len(heads)),
                         "most_local_layers": sorted(range(len(eps)), key=eps.__getitem__)[:3]})
        frac = sum(r["layers_eps_below"] for r in rows) / sum(r["n_layers"] for r in rows)
        out[kind] = {"rows": rows, "fraction_layers_below": frac, "verdict": _verdict(frac)}
    return out


def heatmap(cells: list[dict[str, Any]], length: int) -> tuple[list[list[float]], list[str]]:
    """Layer × distance-bucket mass at ``length`` (mean over kinds), and bucket labels."""
    group = [c for c in cells if c["length"] == length]
    n_layers = len(group[0]["layers"])
    nb = len(group[0]["buckets"])
    grid = [[sum(c["layers"][i]["buckets"][j] for c in group) / len(group) for j in range(nb)]
            for i in range(n_layers)]
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in group[0]["buckets"]]
    return grid, labels


# ----------------------------------------------------------------------------- kvlab validate
def run(study: Study) -> dict[str, Any]:
    """H1's cells: every text at every profile length, stage by stage."""
    return {"cells": profile_pools(study.pools, study.cells, study.model_name)}


def summarize(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """H1's section: ε per length and per text kind, the verdict, and the layer × distance heatmap at the
    longest length."""
    cells = data["cells"]
    s = summarize_cells(cells)
    kinds = list(dict.fromkeys(c["kind"] for c in cells))
    lengths = sorted({c["length"] for c in cells})
    grid, labels = heatmap(cells, lengths[-1])
    return {"verdict": s["verdict"], "summary": s, "cells": cells,
            "heatmap": {"grid": grid, "labels": labels, "length": lengths[-1]},
            "measurement": f"Exact softmax attention of the last 64 prefill queries over the stored keys, per layer "
                           f"and query head, for {', '.join(kinds)} at {', '.join(map(str, lengths))} "
                           f"tokens; sink = first {s.get('sink_tokens')} tokens, local = the last "
                           f"{s.get('local_tokens')} tokens before each query. Supported when ε < 0.05 in at least "
                           f"75% of layers, not supported below 50%.",
            "text": s["summary"] + f"; overall {100 * s.get('fraction_layers_below', 0):.0f}% of layers"}
