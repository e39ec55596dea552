"""A ``kvlab bench gpu`` result for people: the rows of the printed table, and the ``## GPU kernels`` section
of docs/benchmarks.md (:func:`update_docs`, which the command calls after a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvlab.experiments.gpu_timing import device_slug


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The attention rows as printed: one line per (context, batch, variant, part)."""
    out = []
    for r in result["attention"]:
        out.append({"context": f"{r['context'] // 1024}K", "batch": r["batch"],
                    "variant": r["variant"] + ("" if r.get("part", "attention") == "attention" else f" · {r['part']}"),
                    "µs": r.get("us"), "µs graph": r.get("us_graph"), "GB/s": r.get("GBps"),
                    "GB/s graph": r.get("GBps_graph"),
                    "% copy bw": None if r.get("of_copy_bw") is None else 100 * r["of_copy_bw"],
                    "× vs sdpa": r.get("vs_sdpa"), "× vs kvlab full": r.get("vs_kvlab_full"),
                    "note": r.get("error", "")})
    return out


DOCS_SECTION = "## GPU kernels"
PIVOT_COLUMNS = [
    ("torch sdpa", "attention", "SDPA"),
    ("flash-attn", "attention", "flash-attn"),
    ("flashinfer (page 16)", "attention", "FlashInfer"),
    ("kvlab full (bs=16)", "attention", "kvlab full"),
    ("kvlab block-route 1/4 (bs=16)", "attention", "BR 1/4"),
    ("kvlab block-route 1/8 (bs=16)", "attention", "BR 1/8"),
    ("kvlab block-route 1/16 (bs=16)", "attention", "BR 1/16"),
    ("kvlab block-route 1/8 (bs=16)", "centroid scores + top-k + attention", "BR 1/8 + scoring"),
    ("kvlab gather bs=1 at 1/8", "attention", "bs 1 @1/8"),
    ("kvlab gather bs=64 at 1/8", "attention", "bs 64 @1/8"),
]


def _pivot(result: dict[str, Any], timing: str) -> list[str]:
    """One markdown table: a row per (context, batch), a column per variant, µs by ``timing``."""
    timed = {(r["context"], r["batch"], r["variant"], r.get("part")): r[timing]
             for r in result["attention"] if timing in r}
    configs = sorted({(r["context"], r["batch"]) for r in result["attention"]})
    present = [c for c in PIVOT_COLUMNS if any((ctx, b, c[0], c[1]) in timed for ctx, b in configs)]
    lines = ["| context | batch | " + " | ".join(c[2] for c in present) + " |", "|---|---|" + "---|" * len(present)]
    for ctx, b in configs:
        cells = [f"{timed[(ctx, b, v, p)]:.1f}" if (ctx, b, v, p) in timed else "-" for v, p, _ in present]
        lines.append(f"| {ctx // 1024}K | {b} | " + " | ".join(cells) + " |")
    return lines


def markdown_section(result: dict[str, Any]) -> str:
    """The ``## GPU kernels`` section of docs/benchmarks.md for a measured result (µs, median)."""
    rates = result["device_rates"]
    lines = [DOCS_SECTION, "",
             f"Measured by `kvlab bench gpu` on **{result['device']}** ({result['date']}; torch "
             f"{result['versions'].get('torch')}, triton {result['versions'].get('triton')}). Copy bandwidth "
             f"{rates['copy_GBps']:.0f} GB/s (bytes read + written), bf16 matmul {rates['matmul_TFLOPs']:.0f} "
             "TFLOP/s. Decode attention, one query token, 8 KV × 32 query heads, head_dim 128, bf16; µs per call, "
             "median (BR = block-route, blocks of 16, random selection; bs = block size of a gather at budget "
             "1/8). Raw rows, bytes and GB/s: "
             f"`benchmarks/results/{device_slug(result['device'])}.json`.", ""]
    if any("us_graph" in r for r in result["attention"]):
        lines += ["**Kernel time** (the calls replayed from a CUDA graph, so the host's launch overhead is "
                  "out; what a serving engine that captures decode in graphs sees):", ""]
        lines += _pivot(result, "us_graph") + [""]
    lines += ["**Eager launches** (CUDA events around each Python call: host launch overhead included; "
              "at small sizes this is the host, not the GPU):", ""]
    lines += _pivot(result, "us")
    if result["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    if result["e2e"]:
        lines += ["", "End to end, random-weight llama-3.1-8b, bf16, through `kvlab.generation.decode` (CUDA graphs "
                  "on: captured once per decode, then replayed); roofline = (weights + KV bytes read per step) ÷ copy "
                  "bandwidth:", "", "| context × batch | variant | tok/s | ms/step | roofline ms | × roofline |",
                  "|---|---|---|---|---|---|"]
        for r in result["e2e"]:
            cfg = f"{r['context'] // 1024}K × {r['batch']}"
            if "tokens_per_s" in r:
                roof = f"{r['roofline_ms']:.2f} | {r['of_roofline']:.2f}" if "roofline_ms" in r else "- | -"
                lines.append(f"| {cfg} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {roof} |")
            else:
                lines.append(f"| {cfg} | {r['variant']} | - | {r['error'][:80]} | - | - |")
    return "\n".join(lines) + "\n"


def update_docs(result: dict[str, Any], path: Path | str = Path("docs/benchmarks.md")) -> Path:
    """Replace the ``## GPU kernels`` section of ``path`` (or append it) with ``result``'s tables."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    section = markdown_section(result)
    start = text.find(DOCS_SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(DOCS_SECTION))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
