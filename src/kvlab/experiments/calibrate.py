"""PCA projections of K and V per (layer, KV head) for ``low-rank --projection pca`` (``kvlab calibrate``).

The model reads calibration text once through kvlab's store; for every layer and KV head the cached
values, post-RoPE keys and pre-RoPE keys (recovered by un-rotating, see
:class:`~kvlab.methods._lowrank_store.Rope`) give ``X`` ``[tokens, D]``; the basis is the eigenvectors of
``X^T X`` (uncentred, so ``x ~ P P^T x`` with no mean term), sorted by eigenvalue. The share of
``||X||^2`` the top ``R`` directions keep is the *energy* reported. One file per rank:
``$KVLAB_CACHE/calibration/<model>-rank<R>.pt`` holding ``k_pre``, ``k_post``, ``v`` as
``[layers, kv_heads, D, R]`` (:func:`kvlab.files.calibration_path`, where ``low-rank`` finds
it). Calibration text: Python standard-library modules (every other long
module, so evaluation can use the rest).
"""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import check
from kvlab.files import calibration_path


def stdlib_files(part: int) -> list[Path]:
    """Long stdlib modules: ``part=0`` (calibration) and ``part=1`` (evaluation) are disjoint halves."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size >= 40_000)
    check(len(files) >= 2, f"no long Python modules found in {root}")
    return files[part::2]


def text_ids(tokenizer: Any, n_tokens: int, part: int = 0, text_file: Path | None = None, skip: int = 0) -> list[int]:
    """``n_tokens`` token ids of real text (the stdlib half ``part``, or ``text_file``), after ``skip`` files."""
    if text_file is not None:
        check(Path(text_file).is_file(), f"calibration text {text_file} does not exist")
        texts = [Path(text_file).read_text(encoding="utf-8", errors="replace")]
    else:
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(part)[skip:]]
    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids.append(bos)
    for t in texts:
        ids += tokenizer.encode(t, add_special_tokens=False)
        if len(ids) >= n_tokens:
            break
    check(len(ids) >= n_tokens, f"calibration text has only {len(ids)} tokens, asked for {n_tokens}")
    return ids[:n_tokens]


@torch.inference_mode()
def collect(model: Any, ids: list[int]) -> dict[str, dict[int, torch.Tensor]]:
    """Per layer ``[kv_heads, T, D]`` values, post- and pre-RoPE keys of ``ids`` (batch 1)."""
    from kvlab.generation import prefill
    from kvlab.methods._lowrank_store import Rope

    snap = prefill(model, [ids], observe=1)
    out: dict[str, dict[int, torch.Tensor]] = {"k_post": {}, "k_pre": {}, "v": {}}
    for i, layer in enumerate(snap.store.layers):
        k, v, p = layer.dense_view()
        k, v, p = k[0].float(), v[0].float(), p[0]
        out["k_post"][i], out["v"][i] = k, v
        out["k_pre"][i] = Rope(model, i).unrotate(k, p)
    return out


def fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head of ``x`` ``[H, T, D]``: eigenvectors ``[H, D, D]`` (columns, descending) and eigenvalues ``[H, D]``."""
    xd = x.double()
    cov = xd.transpose(1, 2) @ xd
    vals, vecs = torch.linalg.eigh(cov)
    return vecs.flip(-1).float(), vals.flip(-1).clamp(min=0).float()


def energy(vals: torch.Tensor, rank: int) -> float:
    """Mean over heads of the share of ``||X||^2`` the top ``rank`` directions keep."""
    return float((vals[:, :rank].sum(-1) / vals.sum(-1).clamp(min=1e-30)).mean())


def calibrate(model_name: str, ranks: list[int], tokens: int = 2048, text_file: Path | None = None,
              folder: Path | None = None, model: Any = None, tokenizer: Any = None
              ) -> tuple[list[Path], dict[str, Any]]:
    """Fit and save the PCA files for ``ranks``; returns their paths and the energy kept per rank."""
    import kvlab
    from kvlab.io import write_atomic

    check(len(ranks) > 0, "give at least one --rank")
    check(tokens >= 16, f"--tokens must be at least 16, got {tokens}")
    if model is None:
        model, tokenizer = kvlab.load(model_name)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    for r in ranks:
        check(0 < r <= head_dim, f"rank must be in 1..head_dim ({head_dim}), got {r}")
    data = collect(model, text_ids(tokenizer, tokens, 0, text_file))
    bases: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {"model": model_name, "tokens": tokens, "energy": {}}
    for key, per_layer in data.items():
        fitted = [fit(per_layer[i]) for i in sorted(per_layer)]
        bases[key] = torch.stack([vecs for vecs, _ in fitted])  # [L, H, D, D]
        vals = torch.stack([v for _, v in fitted])  # [L, H, D]
        stats["energy"][key] = {r: round(sum(energy(v, r) for v in vals) / len(vals), 5) for r in ranks}
    paths = []
    for r in ranks:
        payload = {"model": model_name, "rank": r, "tokens": tokens,
                   **{k: b[..., :r].contiguous() for k, b in bases.items()},
                   "energy": {k: stats["energy"][k][r] for k in bases}}
        path = calibration_path(model_name, r, folder)
        buf = io.BytesIO()
        torch.save(payload, buf)
        write_atomic(path, buf.getvalue())
        paths.append(path)
    return paths, stats
