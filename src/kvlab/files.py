"""The files kvlab keeps per model under ``$KVLAB_CACHE``, written by an experiment and read by a method:

- the entropy profile, ``profiles/<model>-entropy.json`` (``kvlab profile entropy`` writes it with
  :func:`kvlab.experiments.entropy.save_profile`; the routers' ``dense_layers=auto`` reads its
  ``"dense_layers"`` with :func:`load_dense_layers`);
- the PCA calibration, ``calibration/<model>-rank<R>.pt`` (``kvlab calibrate`` writes it;
  ``low-rank projection=pca`` reads it).

A utility below every layer, because both sides need the same name for the same model: a method cannot import
the experiment that writes its file, nor the model registry (imports flow one way, docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kvlab.errors import KVLabError


def cache_root() -> Path:
    """kvlab's cache directory: ``$KVLAB_CACHE`` or ``~/.cache/kvlab``."""
    return Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab")).expanduser()


def entropy_profile_path(model: str) -> Path:
    """``$KVLAB_CACHE/profiles/<model>-entropy.json``: ``{"model": ..., "dense_layers": [0, 1, ...]}``."""
    safe = model.replace("/", "--").replace(":", "-")
    return cache_root() / "profiles" / f"{safe}-entropy.json"


def load_dense_layers(profile: str) -> list[int]:
    """Dense layers from an entropy profile given as a JSON path or a model name."""
    path = Path(profile).expanduser()
    if not (path.suffix == ".json" or path.is_file()):
        path = entropy_profile_path(profile)
    if not path.is_file():
        raise KVLabError(f"no entropy profile at {path}; create it with `kvlab profile entropy --model {profile}` "
                         f"(or pass dense_layers_profile=<path to a JSON file with \"dense_layers\">)")
    try:
        data = json.loads(path.read_text())
        layers = [int(x) for x in data["dense_layers"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise KVLabError(f"entropy profile {path} has no valid \"dense_layers\" list of ints ({exc})") from None
    return layers


def calibration_path(model_name: str, rank: int, folder: Path | None = None) -> Path:
    """``$KVLAB_CACHE/calibration/<model>-rank<R>.pt`` (or under ``folder``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    return (folder or cache_root() / "calibration") / f"{safe}-rank{rank}.pt"
