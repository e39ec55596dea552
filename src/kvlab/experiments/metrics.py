"""Metric functions shared by the experiments, each small and checked against hand-computed cases.

- :func:`normalized_entropy`: attention entropy divided by ``log(n)`` of the keys a query can see
  (1 = uniform, 0 = one key), the H3 measure (early layers broad, later layers focused).
- :func:`region_mass` / :func:`distance_mass`: attention mass in the sink block, the local window and
  elsewhere (ε), and by log2 distance bucket, the H1 measure (StreamingLLM, Xiao et al. 2023,
  arXiv 2309.17453: attention sinks plus a recent window carry most of the mass).
- :func:`global_eviction_ratio` / :func:`head_consensus`: compression viewed as a perturbation of
  attention routing (arXiv 2603.01426): a fact is lost to a layer only when *every* head of that layer
  lost it (the Global Eviction Ratio), and heads that agree on what to keep (consensus) leave no
  other head to route around an eviction.
- :func:`token_f1`, :func:`is_abstention`: answer scoring (SQuAD-style token F1).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Sequence

import torch

ABSTAIN = "I don't know"


def normalized_entropy(weights: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each attention row ``[..., T]`` divided by ``log(n_visible)`` (0 where n ≤ 1).

    ``visible`` (bool, same shape) marks the keys the query may see; by default every key.
    """
    w = weights.float()
    if visible is None:
        visible = torch.ones_like(w, dtype=torch.bool)
    w = torch.where(visible, w, torch.zeros_like(w))
    ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)
    n = visible.sum(-1).float()
    denom = torch.log(n.clamp_min(2.0))
    return torch.where(n > 1, ent / denom, torch.zeros_like(ent))


def region_mass(weights: torch.Tensor, key_pos: torch.Tensor, q_pos: torch.Tensor, sink: int,
                local: int) -> dict[str, torch.Tensor]:
    """Attention mass ``[...]`` in the sink (key position < ``sink``), the local window (distance <
    ``local``, sink excluded) and elsewhere. ``weights [..., L, T]``, ``key_pos [T]`` (or broadcastable),
    ``q_pos [L]``. Keys with position -1 (empty slots) must carry zero weight."""
    k = key_pos[..., None, :]
    q = q_pos[..., :, None]
    in_sink = (k >= 0) & (k < sink)
    in_local = (q - k < local) & (k >= 0) & ~in_sink
    w = weights.float()
    s = (w * in_sink).sum(-1)
    loc = (w * in_local).sum(-1)
    total = w.sum(-1)
    return {"sink": s, "local": loc, "elsewhere": (total - s - loc).clamp_min(0.0)}


def distance_buckets(max_distance: int) -> list[tuple[int, int]]:
    """Log2 distance buckets ``[0, 1), [1, 2), [2, 4), [4, 8), ...`` covering ``max_distance``."""
    buckets = [(0, 1)]
    lo = 1
    while lo <= max_distance:
        buckets.append((lo, lo * 2))
        lo *= 2
    return buckets


def distance_mass(weights: torch.Tensor, key_pos: torch.Tensor, q_pos: torch.Tensor,
                  buckets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Attention mass ``[..., L, n_buckets]`` by query-key distance bucket ``[lo, hi)``."""
    d = q_pos[..., :, None] - key_pos[..., None, :]
    valid = key_pos[..., None, :] >= 0
    w = weights.float()
    out = [(w * (valid & (d >= lo) & (d < hi))).sum(-1) for lo, hi in buckets]
    return torch.stack(out, -1)


def _as_sets(kept: Sequence[Sequence[int] | set[int] | torch.Tensor]) -> list[set[int]]:
    out = []
    for k in kept:
        if isinstance(k, torch.Tensor):
            k = k.flatten().tolist()
        out.append({int(x) for x in k})
    return out


def global_eviction_ratio(kept_per_head: Sequence[Sequence[int] | set[int] | torch.Tensor],
                          relevant: Sequence[int]) -> float:
    """Fraction of ``relevant`` token positions kept by *no* head of a layer (arXiv 2603.01426).

    ``kept_per_head``: the positions each head of the layer keeps (or reads). 0 when nothing is relevant.
    """
    rel = {int(x) for x in relevant}
    if not rel:
        return 0.0
    union: set[int] = set().union(*_as_sets(kept_per_head)) if kept_per_head else set()
    return len(rel - union) / len(rel)


def head_consensus(kept_per_head: Sequence[Sequence[int] | set[int] | torch.Tensor]) -> float:
    """Mean pairwise Jaccard similarity of the heads' kept position sets (1: all heads keep the same)."""
    sets = _as_sets(kept_per_head)
    if len(sets) < 2:
        return 1.0
    sims = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = sets[i] | sets[j]
            sims.append(len(sets[i] & sets[j]) / len(union) if union else 1.0)
    return sum(sims) / len(sims)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD normalization)."""
    text = text.lower().replace("’", "'")
    text = "".join(ch for ch in text if ch not in set(string.punctuation) - {"'"})
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_abstention(text: str) -> bool:
    """Whether an answer declines: "I don't know", "unknown", "not mentioned", ..."""
    t = normalize_answer(text)
    return any(p in t for p in ("i don't know", "i do not know", "dont know", "unknown", "not mentioned",
                                "does not say", "doesn't say", "not stated", "cannot be determined"))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between a prediction and the gold answer; an abstention matches "I don't know"."""
    if normalize_answer(gold) == normalize_answer(ABSTAIN):
        return 1.0 if is_abstention(prediction) else 0.0
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def first_answer(text: str) -> str:
    """The first non-empty line of a generation, the part scored."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean; 0 for no values."""
    return sum(xs) / len(xs) if xs else 0.0


def boundary_layer(values: Sequence[float]) -> tuple[int, float]:
    """Change point of a per-layer series: the ``b`` (1 ≤ b < n) maximizing mean(values[:b]) -
    mean(values[b:]), and that drop. Layers ``0..b-1`` are the high side."""
    n = len(values)
    if n < 2:
        return n, 0.0
    best, drop = 1, -math.inf
    for b in range(1, n):
        d = sum(values[:b]) / b - sum(values[b:]) / (n - b)
        if d > drop:
            best, drop = b, d
    return best, drop


# ----------------------------------------------------------------------------- routing-physics curves
CORRECT_F1 = 0.5  # an answer counts as correct at token F1 >= 0.5 (a one-word gold: the word itself)


def conditional_accuracy(correct: dict[str, bool], solved: Collection[str]) -> float | None:
    """Accuracy over the questions the full cache answers (``solved``: their ids); None when it solves
    none. ``correct``: question id -> whether this method answered it."""
    ids = [q for q in solved if q in correct]
    if not ids:
        return None
    return sum(correct[q] for q in ids) / len(ids)


def cliff(ratios: Sequence[float], accuracy: Sequence[float | None], full: float, fraction: float = 0.5
          ) -> float | None:
    """The first compression ratio (ascending) at which ``accuracy`` falls below ``fraction`` × ``full``;
    None when it never does (or ``full`` is 0)."""
    if not full:
        return None
    for r, a in sorted(zip(ratios, accuracy, strict=True)):
        if a is not None and a < fraction * full:
            return r
    return None


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or a constant series."""
    if len(x) != len(y) or len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / (sx * sy)


def spike(ratios: Sequence[float], values: Sequence[float]) -> float | None:
    """The ratio at the end of the steepest rise over the previous ratio (ascending ratios; rise per unit of
    ratio, so that an uneven grid such as 0.5, 0.8, 0.85 does not favour its wide step): where a GER curve
    jumps. None with fewer than 2 points."""
    pts = sorted(zip(ratios, values, strict=True))
    if len(pts) < 2:
        return None
    return max(zip(pts[1:], pts[:-1], strict=True),
               key=lambda p: (p[0][1] - p[1][1]) / max(p[0][0] - p[1][0], 1e-9))[0][0]
