"""The machinery every experiment shares: method configurations from the registry, cached cells,
snapshots truncated to a prefill's capture points (:class:`TextPool`, the prefilled real text every
profile and perplexity read), and teacher-forced decoding with a method applied. (The
attention weights the locality experiments read, recomputed from a snapshot's stored keys and observed
queries, are :func:`kvlab.attention.probs.attention_weights`, importable from here too.)

Prefill once, compress many: a context is prefilled once and every method starts from a copy of the
same snapshot. A prompt is split into a prefilled part and a forced tail (at least its last token),
so that no method's answer comes from the uncompressed prefill logits.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlab.attention.probs import attention_weights  # noqa: F401  (the experiments import it from here)
from kvlab.cache.store import LayerStore
from kvlab.errors import KVLabError, check
from kvlab.experiments.texts import bos_ids, text_tokens
from kvlab.generation import Captured, Snapshot, StepInfo, decode, prefill
from kvlab.io import write_atomic
from kvlab.methods.base import Method, by_family, make_method


@dataclass(frozen=True)
class MethodSpec:
    """One method configuration: a label for tables, a registry name, fixed parameters.

    ``fixed``: the method is set by its own parameters (a rank, a bit width, a window), not by a
    token budget; like ``full`` it runs once per experiment, reported at budget 1 (ratio 0).
    """

    label: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()
    fixed: bool = False

    def make(self, budget: float | None) -> Method:
        params = dict(self.params)
        if budget is not None and budget < 1.0 and self.name != "full" and not self.fixed:
            params["budget"] = budget
        return make_method(self.name, **params)

    @property
    def budgetless(self) -> bool:
        """Runs once, not per budget (``full`` and the fixed-setting methods)."""
        return self.name == "full" or self.fixed

    def budgets(self, budgets: list[float]) -> list[float]:
        """The budgets to run this spec at: ``budgets``, or just 1.0 for a budgetless one."""
        return [1.0] if self.budgetless else list(budgets)


def spec(label: str, name: str | None = None, **params: Any) -> MethodSpec:
    return MethodSpec(label, name or label, tuple(sorted(params.items())))


def all_specs() -> list[MethodSpec]:
    """Every registered method in report order: by family (:data:`kvlab.methods.base.FAMILIES`), each in
    registration order (relayout is a cluster-route variant)."""
    out = []
    for cls in by_family():
        out.append(spec(cls.name))
        if cls.name == "cluster-route":
            out.append(spec("cluster-route+relayout", "cluster-route", relayout=True))
    return out


def resolve(labels: list[str] | None, notes: list[str], budget: float = 0.25) -> list[MethodSpec]:
    """The specs for ``labels`` (all when None) that accept a budget, or run once at their own setting;
    the rest are dropped with a note in ``notes``."""
    known = {s.label: s for s in all_specs()}
    wanted = list(known) if labels is None else labels
    out = []
    for label in wanted:
        if label not in known:
            raise KVLabError(f"unknown method {label!r}; allowed: {', '.join(known)}")
        s = known[label]
        try:
            s.make(budget)
        except KVLabError as exc:
            fixed = MethodSpec(f"{s.label} (own setting)", s.name, s.params, fixed=True)
            try:  # a method set by its own parameters (low-rank, quantize, ...) runs once at them
                method = fixed.make(None)
            except KVLabError:
                _note(notes, f"method {s.label!r} skipped: {exc}")
                continue
            if method.compresses:
                out.append(fixed)
                setting = ", ".join(f"{k}={v}" for k, v in method.describe().items()
                                    if v is not None and k not in ("method", "budget", "ratio", "budget_tokens"))
                _note(notes, f"method {s.label!r} takes no budget; it runs once at its own setting ({setting})")
            continue
        out.append(s)
    return out


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def hook_kind(method: Method) -> str:
    """How a method acts, from the hooks it overrides: ``routing`` (chooses what each decode step reads),
    ``eviction`` (changes the cache at prefill or decode: what NIAH also runs question-agnostic),
    ``other`` or ``none``. What a method *is*, for tables, is its :attr:`~kvlab.methods.base.Method.family`."""
    cls = type(method)
    if cls.decode_plan is not Method.decode_plan:
        return "routing"
    if cls.prefill_end is not Method.prefill_end or method.evicts_during_decode():
        return "eviction"
    return "none" if not cls.compresses else "other"


# ----------------------------------------------------------------------------- cell cache
class Cells:
    """One JSON file per finished cell under ``root/<experiment>/``, so an interrupted run resumes."""

    def __init__(self, root: Path | None):
        self.root = root

    def path(self, experiment: str, key: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        text = json.dumps(key, sort_keys=True, default=str)
        return self.root / experiment / (hashlib.sha1(text.encode()).hexdigest()[:16] + ".json")

    def get(self, experiment: str, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(experiment, key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def all(self, experiment: str) -> list[dict[str, Any]]:
        """Every finished cell of ``experiment`` (whatever run wrote it), in file order."""
        if self.root is None:
            return []
        out = []
        for path in sorted((self.root / experiment).glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        return out

    def put(self, experiment: str, key: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        path = self.path(experiment, key)
        if path is not None:
            write_atomic(path, json.dumps({**value, "key": key}, default=float))
        return value


# ----------------------------------------------------------------------------- prefill
def truncate(snapshot: Snapshot, point: int) -> Snapshot:
    """The snapshot as it was after ``point`` tokens (keys at positions ≥ point dropped), from what
    :func:`kvlab.generation.prefill` captured there (``capture=[..., point, ...]``)."""
    check(point in snapshot.captured, f"the prefill captured no point {point}; captured: {sorted(snapshot.captured)}")
    captured = snapshot.captured[point]
    store = snapshot.store.clone()
    for i, window_layer in captured.sliding.items():
        store.layers[i] = window_layer.clone()
    for i, layer in enumerate(store.layers):
        if i in captured.sliding:
            continue
        t = layer.max_length
        idx = (layer.start * layer.block_size)[:, None] + torch.arange(t)[None, :]
        pos = layer.positions[idx.clamp(max=layer.positions.shape[0] - 1)]
        layer.repack(keep=pos < point, reserve_tokens=layer.block_size)
    batch = snapshot.context_lengths.shape[0]
    return Snapshot(store=store, queries=captured.queries, logits=captured.logits,
                    context_lengths=torch.full((batch,), point), scaling=snapshot.scaling,
                    num_query_heads=snapshot.num_query_heads, prefill_seconds=snapshot.prefill_seconds,
                    prompt_ids=[x[:point] for x in snapshot.prompt_ids],
                    captured={k: v for k, v in snapshot.captured.items() if k <= point})


class TextPool:
    """Real code and prose streams of one model, prefilled once (lazily) with capture points at every
    context length; :meth:`at` gives the exact snapshot at any of those lengths."""

    def __init__(self, model: Any, tokenizer: Any, kinds: list[str], lengths: list[int], seed: int = 0,
                 extra: int = 256, block_size: int = 16, total: int | None = None, first_index: int = 0,
                 keep: int | None = None):
        """``total``: tokens drawn per text (default: the longest length + ``extra``). The texts depend on
        it, so two pools with the same ``total``, seed and tokenizer hold the same prompts. Text ``i`` is drawn
        with seed ``seed + first_index + i``: a pool of one kind (one prefill per text, half the memory) holds
        the same text as that kind's row in a pool of all kinds when ``first_index`` is its position there.
        ``keep``: once :func:`profile_cells` has profiled the pool, keep only the snapshot at this length (0:
        none), to free a long prefill's memory for the next pool."""
        self.model, self.kinds, self.lengths = model, kinds, sorted(lengths)
        self.block_size = block_size
        bos = bos_ids(tokenizer)
        total = total or self.lengths[-1] + extra
        check(total >= self.lengths[-1], f"a text pool of {total} tokens cannot reach {self.lengths[-1]}")
        self.total = total
        self.ids = [bos + text_tokens(tokenizer, kind, total - len(bos), seed + first_index + i)
                    for i, kind in enumerate(kinds)]
        self._snap: Snapshot | None = None
        self._held = 0  # the length the snapshot holds
        self.keep = keep

    def _ensure(self, length: int) -> None:
        if self._snap is not None and length > self._held:
            self._snap = None  # shrunk below this length: prefill again
        if self._snap is None:
            longest = self.lengths[-1]
            self._snap = prefill(self.model, [x[:longest] for x in self.ids], capture=self.lengths, chunk_size=1024,
                                 block_size=self.block_size, label=f"prefill {'+'.join(self.kinds)}")
            self._held = longest

    def at(self, length: int) -> tuple[Snapshot, Captured]:
        self._ensure(length)
        assert self._snap is not None
        snap = self._snap if length == self._held else truncate(self._snap, length)
        return snap, snap.captured[length]

    def shrink(self, length: int) -> None:
        """Keep only the snapshot at ``length`` (and the capture points up to it): the memory of a long prefill
        is freed once its longer points are profiled. A longer point asked for later is prefilled again."""
        if self._snap is None or length >= self._held:
            return
        if length <= 0:
            self._snap, self._held = None, 0
            return
        self._snap, _ = self.at(length)
        self._held = length

    @property
    def prefill_seconds(self) -> float | None:
        return None if self._snap is None else self._snap.prefill_seconds


# ----------------------------------------------------------------------------- decoding
@dataclass
class RunResult:
    """What one method did on one snapshot."""

    generated: torch.Tensor  # [B, n] greedy tokens after the forced tail
    forced_nll: torch.Tensor  # [B, n_forced] NLL of forced[:, i] (the first uses the snapshot logits)
    kept: torch.Tensor  # [layers, B, H] tokens held after prefill_end
    reads: dict[int, list[list[set[int]]]] = field(default_factory=dict)  # layer -> [b][h] positions read
    seconds: float = 0.0
    steps: int = 0  # forward passes run in ``seconds``
    compress_seconds: float = 0.0


def _positions_of(layer: LayerStore, row: int, slots: torch.Tensor | None = None) -> set[int]:
    """Original positions of a row's live tokens, or of those at logical ``slots`` (-1 padded)."""
    base = layer.start_host[row] * layer.block_size
    if slots is None:
        pos = layer.positions[base:base + layer.lengths_host[row]]
    else:
        pos = layer.positions[base + slots[slots >= 0]]
    return {p for p in pos.tolist() if p >= 0}


def _reads(info: StepInfo) -> dict[int, list[list[set[int]]]]:
    """What every layer read at one step: its plan's tokens, or everything it holds."""
    reads = {}
    for i, layer in enumerate(info.store.layers):
        plan = info.plans.get(i)
        slots = plan.token_slots(layer.lengths, layer.block_size) if plan is not None else None
        reads[i] = [[_positions_of(layer, b * layer.kv_heads + h, None if slots is None else slots[b, h])
                     for h in range(layer.kv_heads)] for b in range(layer.batch)]
    return reads


def run_method(model: Any, snapshot: Snapshot, method: Method, forced: list[list[int]] | None = None,
               max_new_tokens: int = 0, eos: Collection[int] | None = None, record_reads: bool = False,
               compress: bool = True, label: str | None = None, cuda_graphs: bool = True,
               forced_chunk: int = 1) -> RunResult:
    """Decode from a copy of ``snapshot`` with ``method``: teacher-force ``forced`` (``[B, n]``, every
    step through the method), then generate ``max_new_tokens`` greedily (at least one token; after
    every sequence has ended, its tokens are 0).

    ``record_reads``: the token positions each (layer, sequence, KV head) read at the step whose logits
    give the first generated token -- the selection after eviction and routing, for GER and consensus.
    Runs :func:`kvlab.generation.decode` (forced tokens and a per-step callback; ``cuda_graphs`` and
    ``forced_chunk`` are its arguments: on CUDA, steps replayed from CUDA graphs where the method allows;
    forced tokens fed that many per step, for a method that does not evict during decode).
    """
    batch = snapshot.context_lengths.shape[0]
    n_forced = len(forced[0]) if forced else 0
    reads: dict[int, list[list[set[int]]]] = {}

    def record(info: StepInfo) -> None:
        if info.step == n_forced - 1:
            reads.update(_reads(info))

    result = decode(model, snapshot, method, max(1, max_new_tokens), eos_token_id=sorted(set(eos or ())),
                    forced=forced or None, on_step=record if record_reads and n_forced else None, compress=compress,
                    label=label or f"decode ({method.name})", cuda_graphs=cuda_graphs, forced_chunk=forced_chunk)
    generated = result.tokens.cpu()
    if eos:  # after a sequence's end of sequence its tokens are 0
        ended = torch.isin(generated, torch.tensor(sorted(set(eos)), dtype=torch.long))
        before = torch.cumsum(ended.long(), 1) - ended.long() > 0
        generated = torch.where(before, torch.zeros_like(generated), generated)
    return RunResult(
        generated=generated,
        forced_nll=result.forced_nll.cpu() if result.forced_nll is not None else torch.zeros(batch, 0),
        kept=result.kept_after_prefill.cpu(), reads=reads, seconds=result.decode_seconds, steps=result.steps_run,
        compress_seconds=result.compress_seconds,
    )


def budget_label(b: float) -> str:
    return f"1/{round(1 / b)}" if b < 1 and abs(1 / b - round(1 / b)) < 1e-6 else f"{b:g}"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
