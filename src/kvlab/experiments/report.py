"""The validation report: ``report.html`` (self-contained, PNG plots embedded as base64), the plots as
PNG files, and ``results.json``. One section per hypothesis and experiment: the claim, the measurement,
a verdict (supported / not supported / inconclusive) with its numbers, the plots; then a conclusion.
Plots use matplotlib's Agg backend and name the machine and model they come from.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvlab.io import write_atomic

CLAIMS = {
    "h1": ("H1 · Attention locality",
           "Queries at the end of a long context put almost all attention on the first block (the attention sink) "
           "and a local window (StreamingLLM, arXiv 2309.17453); the rest, ε, is small (< 0.05) in most layers."),
    "h3": ("H3 · Entropy by layer",
           "Early layers attend broadly (high normalized entropy) and resist compression; after a boundary layer "
           "entropy drops. The boundary is stable across prompts and agrees across model families."),
    "h2": ("H2 · Memory access dominates attention latency",
           "At equal token budget, scattered reads (token gathers) cost more than the FLOPs they save; contiguous "
           "blocks do not, and the gap widens with context length."),
    "niah": ("Needle in a haystack",
             "Retrieval-heavy work is where position-aware selection is expected to break: a needle far from the "
             "sink and the local window must be found by the router. Decode-time routing sees the question; "
             "prefill-time eviction is run question-aware (question in its observation window) and "
             "question-agnostic (compressed before the question)."),
    "ppl": ("Perplexity vs compression",
            "Teacher-forced perplexity of the continuation of long real texts, with each method applied at every "
            "decode step; a method that keeps what matters stays close to the full cache."),
    "synthetic": ("Routing physics (arXiv 2603.01426)",
                  "Compression perturbs attention routing: past a cliff near 90% compression answers collapse and "
                  "hallucinations rise, tracking the Global Eviction Ratio (answer-relevant tokens lost to every head "
                  "of a layer)."),
}


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_dir: Path, name: str, footer: str) -> Path:
    fig.text(0.01, 0.005, footer, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def plot_locality(h1: dict[str, Any], out_dir: Path, foot: str, model: str) -> list[Path]:
    """H1: ε and the mass by region per layer, ε per text kind, the layer × distance heat map."""
    if not h1.get("summary", {}).get("rows"):
        return []
    paths = [_locality_regions(h1["summary"]["rows"], out_dir, foot)]
    kinds = h1["summary"].get("by_kind") or {}
    if len(kinds) > 1:
        paths.append(_locality_by_kind(kinds, out_dir, foot))
    if h1.get("heatmap"):
        paths.append(_locality_heatmap(h1["heatmap"], out_dir, foot))
    return paths


def _locality_regions(rows: list[dict[str, Any]], out_dir: Path, foot: str) -> Path:
    fig, axes = _plt().subplots(1, 2, figsize=(12, 4))
    for r in rows:
        axes[0].plot(r["eps_per_layer"], marker="o", label=f"{r['length']} tokens")
    axes[0].axhline(0.05, color="red", ls="--", lw=1, label="ε = 0.05")
    axes[0].set(xlabel="layer", ylabel="ε (mass outside sink + local)", title="ε per layer")
    axes[0].legend(fontsize=8)
    last = rows[-1]
    n = len(last["eps_per_layer"])
    axes[1].bar(range(n), last["sink_per_layer"], label="sink")
    axes[1].bar(range(n), last["local_per_layer"], bottom=last["sink_per_layer"], label="local")
    axes[1].bar(range(n), last["eps_per_layer"],
                bottom=[a + b for a, b in zip(last["sink_per_layer"], last["local_per_layer"], strict=True)],
                label="elsewhere")
    axes[1].set(xlabel="layer", ylabel="attention mass", title=f"mass by region at {last['length']} tokens")
    axes[1].legend(fontsize=8)
    return _save(fig, out_dir, "h1_locality", foot)


def _locality_by_kind(kinds: dict[str, Any], out_dir: Path, foot: str) -> Path:
    fig, axes = _plt().subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, (kind, v) in zip(axes[0], kinds.items(), strict=True):
        for r in v["rows"]:
            ax.plot(r["eps_per_layer"], marker="o", label=f"{r['length']} tokens")
        ax.axhline(0.05, color="red", ls="--", lw=1)
        ax.set(xlabel="layer", ylabel="ε", title=f"ε per layer: {kind} ({v['verdict']})", ylim=(0, 1))
        ax.legend(fontsize=8)
    return _save(fig, out_dir, "h1_locality_by_kind", foot)


def _locality_heatmap(heatmap: dict[str, Any], out_dir: Path, foot: str) -> Path:
    grid, labels = heatmap["grid"], heatmap["labels"]
    fig, ax = _plt().subplots(figsize=(10, 5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set(xlabel="query-key distance (tokens)", ylabel="layer",
           title=f"attention mass by distance at {heatmap['length']} tokens")
    fig.colorbar(im, ax=ax)
    return _save(fig, out_dir, "h1_distance_heatmap", foot)


def plot_entropy(h3: dict[str, Any], out_dir: Path, foot: str, model: str) -> list[Path]:
    """H3: entropy per layer of every model by relative depth, and each model's layer × head grid."""
    if not h3.get("models"):
        return []
    fig, axes = _plt().subplots(1, 1 + len(h3["models"]), figsize=(5 * (1 + len(h3["models"])), 4))
    for s in h3["models"]:
        n = len(s["entropy_per_layer"])
        axes[0].plot([i / max(1, n - 1) for i in range(n)], s["entropy_per_layer"], marker="o", label=s["model"])
    axes[0].set(xlabel="relative depth (layer / last layer)", ylabel="normalized entropy", title="entropy per layer")
    axes[0].legend(fontsize=8)
    for ax, s in zip(axes[1:], h3["models"], strict=False):
        heads = s["entropy_per_head"]
        width = max(len(h) for h in heads)
        grid = [h + [math.nan] * (width - len(h)) for h in heads]
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
        if s["boundary"]:
            ax.axhline(s["boundary"] - 0.5, color="cyan", lw=2)
        ax.set(xlabel="query head", ylabel="layer", title=f"{s['model']}: layer × head")
        fig.colorbar(im, ax=ax)
    return [_save(fig, out_dir, "h3_entropy", foot)]


def plot_access(h2: dict[str, Any], out_dir: Path, foot: str, model: str) -> list[Path]:
    """H2: time and bandwidth by block size for every access benchmark (each footed with its machine), and
    the end-to-end decode speed."""
    paths = [_access_bench(bench, out_dir, f"{model} · {bench['machine']}") for bench in h2.get("bench") or []]
    if h2.get("e2e", {}).get("rows"):
        paths.append(_access_e2e(h2["e2e"], out_dir, foot))
    return paths


def _access_bench(bench: dict[str, Any], out_dir: Path, foot: str) -> Path:
    rows = bench["rows"]
    contexts = sorted({r["context"] for r in rows})
    blocks = [b for b in dict.fromkeys(r["block"] for r in rows) if isinstance(b, int)]
    fig, axes = _plt().subplots(1, 2, figsize=(12, 4))
    for c in contexts:
        sel = {r["block"]: r for r in rows if r["context"] == c}
        axes[0].plot(blocks, [1e3 * sel[b]["seconds"] for b in blocks], marker="o", label=f"{c // 1024}K")
        axes[0].axhline(1e3 * sel["full"]["seconds"], ls=":", lw=1, color=axes[0].lines[-1].get_color())
        axes[1].plot(blocks, [sel[b]["gbps"] for b in blocks], marker="o", label=f"{c // 1024}K")
    axes[1].axhline(bench["copy_gbps"], color="red", ls="--",
                    label="copy bandwidth (bytes copied per s; read + write traffic is 2×)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (tokens; 1 = scattered)")
        ax.legend(fontsize=8)
    axes[0].set(ylabel="ms per decode attention (dotted: full)", yscale="log",
                title=f"equal budget {bench['budget']:g}: time")
    axes[1].set(ylabel="effective GB/s of K+V read", title="effective bandwidth")
    return _save(fig, out_dir, f"h2_access_{bench['device']}", foot)


def _access_e2e(e2e: dict[str, Any], out_dir: Path, foot: str) -> Path:
    rows = e2e["rows"]
    fig, ax = _plt().subplots(figsize=(7, 4))
    ax.bar([r["method"] for r in rows], [r["tokens_per_second"] for r in rows], color="#4a7")
    ax.set(ylabel="decode tokens/s", title=f"end to end at budget {e2e['budget']:g}, "
                                           f"{e2e['context']} tokens × {e2e['batch']}")
    ax.tick_params(axis="x", rotation=20)
    return _save(fig, out_dir, "h2_e2e", foot)


def plot_niah(nh: dict[str, Any], out_dir: Path, foot: str, model: str) -> list[Path]:
    """Needles: accuracy by budget per method and mode, and a depth × length heat map per budget."""
    if not nh.get("summary", {}).get("rows"):
        return []
    paths = [_niah_accuracy(nh["summary"], out_dir, foot)]
    return paths + [_niah_heatmap(hm, out_dir, foot) for hm in nh.get("heatmaps", [])]


def _niah_accuracy(summary: dict[str, Any], out_dir: Path, foot: str) -> Path:
    rows = summary["rows"]
    fig, ax = _plt().subplots(figsize=(9, 5))
    for (m, mode) in dict.fromkeys((r["method"], r["mode"]) for r in rows if r["method"] != "full"):
        sel = sorted((r for r in rows if r["method"] == m and r["mode"] == mode), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in sel], [r["accuracy"] for r in sel], marker="o",
                ls="-" if mode == "aware" else "--", label=m + ("" if mode == "aware" else " (agnostic)"))
    if summary.get("full_accuracy") is not None:
        ax.axhline(summary["full_accuracy"], color="black", ls=":", label="full")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="budget (fraction of context read or kept)", ylabel="accuracy", title="needle accuracy")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir, "niah_accuracy", foot)


def _niah_heatmap(hm: dict[str, Any], out_dir: Path, foot: str) -> Path:
    panels = hm["panels"]
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = _plt().subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels, strict=False):
        ax.imshow(p["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(p["lengths"])), [str(x) for x in p["lengths"]], fontsize=7)
        ax.set_yticks(range(len(p["depths"])), [f"{d:.0%}" for d in p["depths"]], fontsize=7)
        ax.set_title(p["title"], fontsize=8)
        ax.set_xlabel("context", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, out_dir, f"niah_heatmap_{hm['budget']:g}".replace(".", "_"), foot)


def plot_ppl(pp: dict[str, Any], out_dir: Path, foot: str, model: str) -> list[Path]:
    """Perplexity by budget per method, the full cache's as a line."""
    if not pp.get("summary", {}).get("rows"):
        return []
    rows = pp["summary"]["rows"]
    fig, ax = _plt().subplots(figsize=(9, 5))
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in sel], [r["ppl"] for r in sel], marker="o", label=m)
    if pp["summary"].get("full_ppl"):
        ax.axhline(pp["summary"]["full_ppl"], color="black", ls=":", label="full")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="budget", ylabel="perplexity (log)", title="teacher-forced perplexity")
    ax.legend(fontsize=7, ncol=2)
    return [_save(fig, out_dir, "ppl", foot)]


def plot_synthetic(sy: dict[str, Any], out_dir: Path, foot: str, model: str) -> list[Path]:
    """Routing physics: F1, accuracy, hallucination and GER by ratio; GER and head consensus per layer at the
    highest ratio; head consensus by depth on every model compared."""
    if not sy.get("summary", {}).get("rows"):
        return []
    rows = sy["summary"]["rows"]
    paths = [_synthetic_curves(sy["summary"], out_dir, foot)]
    top = max(r["ratio"] for r in rows)
    at_top = [r for r in rows if r["ratio"] == top]
    if at_top and at_top[0]["consensus_per_layer"]:
        paths.append(_synthetic_layers(at_top, top, out_dir, foot))
    cc = sy.get("consensus_compare")
    if cc and any(cc["models"].values()):
        paths.append(_synthetic_consensus_models(cc["models"], out_dir, foot))
    return paths


def _synthetic_curves(summary: dict[str, Any], out_dir: Path, foot: str) -> Path:
    rows = summary["rows"]
    fig, axes = _plt().subplots(1, 4, figsize=(19, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["ratio"])
        x = [r["ratio"] for r in sel]
        axes[0].plot(x, [r["f1"] for r in sel], marker="o", label=m)
        if all(r.get("cond_accuracy") is not None for r in sel):
            axes[1].plot(x, [r["cond_accuracy"] for r in sel], marker="o", label=m)
        axes[2].plot(x, [r["hallucination"] for r in sel], marker="o", label=m)
        axes[3].plot(x, [r["ger"] for r in sel], marker="o", label=m)
    if summary.get("full_f1") is not None:
        axes[0].axhline(summary["full_f1"], color="black", ls=":", label="full")
    axes[1].axhline(0.5, color="red", ls="--", lw=1, label="half of full (the cliff)")
    titles = ("token F1", "accuracy on what full answers", "hallucination rate", "mean Global Eviction Ratio")
    for ax, t in zip(axes, titles, strict=False):
        ax.set(xlabel="compression ratio", ylabel=t, title=t)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    return _save(fig, out_dir, "synthetic", foot)


def _synthetic_layers(rows: list[dict[str, Any]], ratio: float, out_dir: Path, foot: str) -> Path:
    fig, axes = _plt().subplots(1, 2, figsize=(13, 0.5 * len(rows) + 2))
    for ax, field, t in ((axes[0], "ger_per_layer", "GER"), (axes[1], "consensus_per_layer", "head consensus")):
        im = ax.imshow([r[field] for r in rows], aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(rows)), [r["method"] for r in rows], fontsize=7)
        ax.set(xlabel="layer", title=f"{t} per layer at ratio {ratio:g}")
        fig.colorbar(im, ax=ax)
    return _save(fig, out_dir, "synthetic_layers", foot)


def _synthetic_consensus_models(models: dict[str, Any], out_dir: Path, foot: str) -> Path:
    keys = list(dict.fromkeys(k for prof in models.values() for k in prof))
    fig, axes = _plt().subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        for name, prof in models.items():
            if k in prof:
                y = prof[k]["per_layer"]
                ax.plot([i / max(1, len(y) - 1) for i in range(len(y))], y, marker=".", label=name)
        ax.set(xlabel="relative depth", ylabel="head consensus", title=k, ylim=(0, 1.05))
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "synthetic_consensus_models", foot)


# A section's plots: ``plot(section, out_dir, footer, model)`` writes its PNGs and returns their paths, in
# the order the report shows them.
PLOTS: dict[str, Callable[[dict[str, Any], Path, str, str], list[Path]]] = {
    "h1": plot_locality, "h3": plot_entropy, "h2": plot_access, "niah": plot_niah, "ppl": plot_ppl,
    "synthetic": plot_synthetic,
}


def plot_all(results: dict[str, Any], out_dir: Path) -> dict[str, list[Path]]:
    """Every plot, grouped by section; each PNG written into ``out_dir``."""
    model = results.get("model", "?")
    foot = f"{model} · {results.get('machine', '?')} · kvlab validate --{results.get('mode', '?')}"
    ex = results.get("experiments", {})
    figs: dict[str, list[Path]] = {}
    for key, plot in PLOTS.items():
        if ex.get(key) and (paths := plot(ex[key], out_dir, foot, model)):
            figs[key] = paths
    return figs


# ----------------------------------------------------------------------------- html
def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


TABLE_COLUMNS = {
    "h2": ("e2e", ["method", "tokens_per_second", "seconds", "steps", "compress_seconds"]),
    "niah": ("summary", ["method", "mode", "budget", "accuracy", "n"]),
    "ppl": ("summary", ["method", "budget", "ppl", "vs_full"]),
    "synthetic": ("summary", ["method", "ratio", "n", "f1", "accuracy", "cond_accuracy", "hallucination",
                              "n_hall_cases", "ger", "max_layer_ger", "consensus"]),
}


def render_html(results: dict[str, Any], figs: dict[str, list[Path]]) -> str:
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
           "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:2px 6px}.v{font-weight:bold;padding:2px 8px;border-radius:4px}"
           ".supported{background:#cfc}.notsupported{background:#fcc}.inconclusive{background:#ffc}"
           ".note{color:#666;font-size:13px}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kvlab validation report</title>"
             f"<style>{css}</style></head><body>",
             "<h1>kvlab validation report</h1>",
             f"<p>Model <b>{html.escape(str(results.get('model')))}</b> · run <b>--{results.get('mode')}</b> · "
             f"machine: {html.escape(str(results.get('machine')))} · started {results.get('started')} · "
             f"{results.get('seconds', 0):.0f} s wall ({results.get('cpu_seconds', 0):.0f} CPU-seconds) of work in "
             f"this invocation</p>",
             "<p>The claim under test: on real hardware, position-aware block-contiguous selection with cheap "
             "centroid routing beats similarity-aware scattered selection at equal compression, because "
             "contiguous memory access dominates decode latency.</p>"]
    ex = results.get("experiments", {})
    for key, (title, claim) in CLAIMS.items():
        sec = ex.get(key)
        parts.append(f"<h2>{html.escape(title)}</h2><p><i>Claim.</i> {html.escape(claim)}</p>")
        if not sec:
            parts.append("<p class='note'>Not run in this invocation.</p>")
            continue
        v = sec.get("verdict")
        if v:
            parts.append(f"<p><i>Verdict.</i> <span class='v {v.replace(' ', '')}'>{html.escape(v)}</span></p>")
        parts.append(f"<p><i>Measurement.</i> {html.escape(sec.get('measurement', ''))}</p>")
        parts.append(f"<p><i>Numbers.</i> {html.escape(sec.get('text', ''))}</p>")
        if key in TABLE_COLUMNS:
            sub, cols = TABLE_COLUMNS[key]
            rows = sec.get(sub, {}).get("rows") if isinstance(sec.get(sub), dict) else None
            if rows:
                parts.append(_table(rows, cols))
        for path in figs.get(key, []):
            parts.append(_img(path))
    parts.append("<h2>Conclusion</h2>")
    parts.append("".join(f"<p>{html.escape(p)}</p>" for p in results.get("conclusion", [])))
    if results.get("notes"):
        parts.append("<h3>Notes (skipped methods, cells that could not run)</h3><ul>")
        parts.extend(f"<li class='note'>{html.escape(n)}</li>" for n in results["notes"])
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Plots, ``results.json`` and ``report.html`` into ``out_dir``; returns the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = plot_all(results, out_dir)
    results = {**results, "plots": {k: [p.name for p in v] for k, v in figs.items()}}
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1, default=float))
    path = write_atomic(out_dir / "report.html", render_html(results, figs))
    write_atomic(out_dir / "summary.md", markdown(results))
    for p in (path, out_dir / "results.json", out_dir / "summary.md"):
        p.chmod(0o644)
    return path


# ----------------------------------------------------------------------------- markdown
def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict[str, Any]) -> str:
    """``summary.md``: every verdict with its numbers, and the tables docs/results.md is written from."""
    ex = results.get("experiments", {})
    lines = [f"# kvlab validate --{results.get('mode')} · {results.get('model')}", "",
             f"{results.get('machine')}; started {results.get('started')}; {results.get('seconds', 0):.0f} s wall, "
             f"{results.get('cpu_seconds', 0):.0f} CPU-seconds in this invocation; sections (wall / CPU s): "
             + ", ".join(f"{k} {v:.0f} / {results.get('cpu_timings', {}).get(k, 0):.0f}"
                         for k, v in results.get("timings", {}).items()), "",
             "| section | verdict | numbers |", "|---|---|---|"]
    for key, sec in ex.items():
        if isinstance(sec, dict) and "verdict" in sec:
            lines.append(f"| {key} | **{sec['verdict']}** | {sec.get('text', '').replace('|', '/')} |")
    h1 = ex.get("h1", {}).get("summary", {})
    if h1.get("by_kind"):
        lines += ["", "## H1: ε per text kind", "", "| kind | length | mean ε | layers ε < 0.05 | heads ε < 0.05 | "
                  "most local layers |", "|---|---|---|---|---|---|"]
        for kind, v in h1["by_kind"].items():
            for r in v["rows"]:
                lines.append(f"| {kind} ({v['verdict']}) | {r['length']} | {r['mean_eps']:.3f} | "
                             f"{r['layers_eps_below']}/{r['n_layers']} | {r['heads_eps_below_fraction']:.2f} | "
                             f"{r['most_local_layers']} |")
    h3 = ex.get("h3")
    if h3:
        lines += ["", "## H3: entropy per model", "", "| model | boundary after layer | drop | prompts within ±1 | "
                  "stable | relative | entropy per layer |", "|---|---|---|---|---|---|---|"]
        for s in h3["models"] + ([h3["main_all_lengths"]] if h3.get("main_all_lengths") else []):
            lines.append(f"| {s['model']} | {s['boundary'] - 1 if s['boundary'] else '-'} | {s['drop']:.3f} | "
                         f"{100 * s['agreement']:.0f}% | {s['stable']} | {s['relative_boundary']:.2f} | "
                         + " ".join(f"{x:.2f}" for x in s["entropy_per_layer"]) + " |")
    sy = ex.get("synthetic", {}).get("summary")
    if sy:
        lines += ["", "## Routing physics", "", f"{sy.get('solved')} questions answered by the full cache; by family: "
                  + ", ".join(f"{f} {v['solved']}/{v['n']}" for f, v in sy.get("families", {}).items()), "",
                  "| method | ratio | F1 | acc. | cond. acc. | halluc. (cases) | mean GER | worst-layer GER | "
                  "consensus |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sy["rows"]:
            lines.append(f"| {r['method']} | {r['ratio']:g} | {_f(r['f1'])} | {_f(r.get('accuracy'))} | "
                         f"{_f(r.get('cond_accuracy'))} | {_f(r['hallucination'])} ({r['n_hall_cases']}) | "
                         f"{_f(r['ger'])} | {_f(r['max_layer_ger'])} | {_f(r['consensus'])} |")
        lines += ["", "| method | cliff | GER spike | worst-layer spike | corr(GER, cond. acc.) |",
                  "|---|---|---|---|---|"]
        for m, c in sy.get("curves", {}).items():
            lines.append(f"| {m} | {_f(c['cliff'])} | {_f(c['ger_spike'])} | {_f(c['worst_layer_spike'])} | "
                         f"{_f(c['correlation'])} |")
        cc = ex["synthetic"].get("consensus_compare")
        if cc:
            lines += ["", f"Head consensus by layer on {cc['questions']} shared questions:", "",
                      "| model | method@ratio | shape | first third | last third | per layer |",
                      "|---|---|---|---|---|---|"]
            for name, prof in cc["models"].items():
                for k, v in prof.items():
                    lines.append(f"| {name} | {k} | {v['shape']} | {v['early']:.2f} | {v['late']:.2f} | "
                                 + " ".join(f"{x:.2f}" for x in v["per_layer"]) + " |")
    for key, cols in (("niah", ["method", "mode", "budget", "accuracy", "n"]), ("ppl", ["method", "budget", "ppl",
                                                                                         "vs_full"])):
        rows = ex.get(key, {}).get("summary", {}).get("rows")
        if rows:
            lines += ["", f"## {key}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_f(r.get(c), 3) for c in cols) + " |" for r in rows]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"
