"""What the experiments of one ``kvlab validate`` run share: its configuration (:class:`Config`), the
guard a prefill passes first (:func:`check_context`), and a :class:`Study`.

A study holds the model and its tokenizer, the configuration, the cell cache, the notes every experiment
appends to, the method specs, and the seeded real texts, prefilled once and only when one of their cells is
missing. Each experiment's ``run(study)`` reads what it needs from here; its ``summarize(data, cfg)`` reads
only its data and the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvlab.errors import KVLabError
from kvlab.experiments.runner import Cells, MethodSpec, TextPool, resolve

# The sections of a run, in the order it takes them unless told otherwise (``validate.EXPERIMENTS`` holds
# each one's ``run`` and ``summarize``).
SECTIONS = ("h1", "h3", "h2", "niah", "ppl", "synthetic")


@dataclass
class Config:
    """What one validation run measures."""

    profile_lengths: list[int]
    kinds: list[str]
    access_contexts: list[int]
    access_reps: int
    e2e_budget: float
    e2e_steps: int
    niah_lengths: list[int]
    niah_depths: list[float]
    niah_kinds: list[str]
    niah_budgets: list[float]
    ppl_lengths: list[int]
    ppl_tokens: int
    ppl_budgets: list[float]
    synthetic_length: int
    synthetic_ratios: list[float]
    synthetic_per_task: int
    methods: list[str] | None  # None: every registered method
    # cluster-route+relayout reads exactly what cluster-route reads (only the memory layout differs), so its
    # accuracy is cluster-route's; H2's end-to-end timing runs it
    exclude: list[str] = field(default_factory=list)
    # The methods set by their own parameters (low-rank, quantize, local-global, cross-layer) in the needle
    # sweep too; False leaves them to perplexity and the synthetic tasks.
    fixed_in_niah: bool = True
    other_model_lengths: list[int] = field(default_factory=list)  # H3 on the other built-in family
    niah_new_tokens: int = 6  # a 5-digit pass key is 5 tokens (digits are single tokens) + end of turn
    synthetic_new_tokens: int = 6
    seed: int = 0
    # Where a model needs its own sizing (a larger model on the same 2 cores):
    order: list[str] = field(default_factory=lambda: list(SECTIONS))  # the sections run (in this order)
    synthetic_focus: dict[str, int] = field(default_factory=dict)  # extra instances of the families it can do
    synthetic_batch: int = 0  # prompts per prefill (0: all at once)
    synthetic_methods: list[str] | None = None  # None: ``methods``
    niah_methods: list[str] | None = None
    ppl_methods: list[str] | None = None
    h3_models: list[str] | str = "auto"  # the other models profiled for H3; "auto": every other built-in one
    # H3 across sizes compares every model on ``other_model_lengths``; the main model's full profile (all of
    # ``profile_lengths``) is reported beside it.
    consensus_model: str | None = None  # a second model run on the same synthetic prompts (consensus by layer)
    consensus_methods: list[str] = field(default_factory=list)
    consensus_ratios: list[float] = field(default_factory=list)
    ppl_from_profile: bool = False  # continue the profile texts for perplexity (no prefill of its own)
    pool_per_kind: bool = False  # prefill each text on its own (batch 1): half the peak memory at long contexts
    profile_stages: list[list[int]] = field(default_factory=list)  # profile_lengths in prefill stages (see below)



def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number where unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def estimate_memory(model: Any, context: int, batch: int = 1, chunk: int = 1024, copies: int = 3) -> int:
    """Bytes a prefill of ``batch × context`` tokens needs: the weights, the KV store ``copies`` times
    (snapshot, a method's copy, a repack), and the attention scores of one chunk over the context."""
    cfg = model.config
    elt = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elt * context * batch
    # torch's CPU SDPA with a bool mask: the mask (1 byte) and about 2 more bytes per score held at once
    # (measured: 2.3 GB more peak memory for a [2, 12, 1024, 32768] call); 5 bytes leaves a margin
    scores = batch * cfg.num_attention_heads * min(chunk, context) * context * (1 + 4)
    return weights + copies * kv + scores + (256 << 20)


def check_context(model: Any, model_name: str, context: int, batch: int = 1, copies: int = 3) -> None:
    """Refuse a context beyond the model's limit or beyond memory, with the estimate."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise KVLabError(f"context of {context} tokens exceeds {model_name}'s limit of {limit} tokens")
    need, have = estimate_memory(model, context, batch, copies=copies), available_memory()
    if need > 0.85 * have:
        raise KVLabError(f"context of {context} tokens × {batch} needs about {need / 2**30:.1f} GiB "
                         f"(weights + KV cache ×3 + attention scores) but only {have / 2**30:.1f} GiB is available")


@dataclass
class Study:
    """One validation run of ``model_name`` under ``cfg``.

    ``stages``: the text pools per profile stage (:meth:`text_pools`); ``ppl_pools``: the pools perplexity
    continues (those of a profile stage, or its own). ``other_model``: the models H3 also profiles ("auto":
    the config's ``h3_models``; None: none). ``extra_benches``: H2 access benchmarks measured elsewhere.
    ``cuda_graphs``: decode steps replayed from CUDA graphs on a GPU (nothing changes on the CPU).
    """

    model: Any
    tokenizer: Any
    model_name: str
    cfg: Config
    cells: Cells
    notes: list[str] = field(default_factory=list)
    other_model: str | None = "auto"
    device_bench: bool = True
    extra_benches: list[dict[str, Any]] = field(default_factory=list)
    cuda_graphs: bool = True
    specs: list[MethodSpec] = field(init=False, default_factory=list)  # cfg.methods, resolved
    stages: list[list[TextPool]] = field(init=False, default_factory=list)
    ppl_pools: list[TextPool] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.specs = [s for s in resolve(cfg.methods, self.notes) if s.label not in cfg.exclude]
        self.stages, self.ppl_pools = self.text_pools()

    @property
    def stage_lengths(self) -> list[list[int]]:
        """The profile lengths per prefill stage (one stage of every length unless ``profile_stages``)."""
        return self.cfg.profile_stages or [self.cfg.profile_lengths]

    @property
    def pools(self) -> list[TextPool]:
        """Every profile pool, stage by stage."""
        return [p for stage in self.stages for p in stage]

    def methods(self, labels: list[str] | None) -> list[MethodSpec]:
        """The specs of ``labels`` (None: the run's ``specs``), without the config's ``exclude``."""
        if labels is None:
            return self.specs
        return [s for s in resolve(labels, self.notes) if s.label not in self.cfg.exclude]

    def text_pools(self) -> tuple[list[list[TextPool]], list[TextPool]]:
        """The seeded texts of every profile stage, and the pools perplexity continues.

        Perplexity continues the profile texts when its lengths are among a stage's (one prefill for H1,
        H3 and perplexity). ``pool_per_kind``: one prefill per text (batch 1), each profiled before the
        next is prefilled. ``profile_stages``: the lengths in stages, each its own prefill of the same
        texts (the short points are decided before the long prefill starts); a pool nothing else uses
        frees its prefill once profiled.
        """
        cfg, stages = self.cfg, self.stage_lengths
        shared_ppl = cfg.ppl_from_profile and any(set(cfg.ppl_lengths) <= set(st) for st in stages)
        ppl_stage = next((i for i, st in enumerate(stages) if set(cfg.ppl_lengths) <= set(st)), None) if shared_ppl \
            else None
        total = max(cfg.profile_lengths) + (cfg.ppl_tokens + 8 if shared_ppl else 32)
        groups = [[k] for k in cfg.kinds] if cfg.pool_per_kind else [list(cfg.kinds)]
        staged = [[TextPool(self.model, self.tokenizer, g, st, cfg.seed, total=total,
                            first_index=cfg.kinds.index(g[0]),
                            keep=None if not cfg.pool_per_kind and len(stages) == 1
                            else (max(cfg.ppl_lengths) if i == ppl_stage else 0))
                   for g in groups] for i, st in enumerate(stages)]
        ppl_pools = staged[ppl_stage] if ppl_stage is not None else [
            TextPool(self.model, self.tokenizer, cfg.kinds, cfg.ppl_lengths, cfg.seed, extra=cfg.ppl_tokens + 8)]
        return staged, ppl_pools
