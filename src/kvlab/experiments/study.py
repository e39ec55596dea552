"""What the experiments of one ``kvlab validate`` run share: a :class:`Study`.

The model and its tokenizer, the configuration (:class:`kvlab.experiments.validate.Config`), the cell
cache, the notes every experiment appends to, the method specs, and the seeded real texts, prefilled
once and only when one of their cells is missing. Each experiment's ``run(study)`` reads what it needs
from here; its ``summarize(data, cfg)`` reads only its data and the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvlab.experiments.locality import TextPool
from kvlab.experiments.runner import Cells, MethodSpec, resolve

if TYPE_CHECKING:
    from kvlab.experiments.validate import Config


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
