"""Every scorer press inside vLLM: :class:`~kvlab.methods.scorer.ScorerMethod` (SnapKV, PyramidKV, K-norm,
random, TOVA and H2O with ``decode_evict=false``, and any scorer added later) on the prefill-end path
kv-compress uses (TOVA and H2O evict while decoding by default: :mod:`kvlab.vllm.methods.held`).

In the step that completes a prompt, every layer gathers the prompt's keys and values from vLLM's pages and
runs the method's own :meth:`~kvlab.methods.scorer.ScorerMethod.score` on them
(:func:`kvlab.methods.scorer.score_prompt`, the code kvlab's engine runs); after the forward each KV head keeps
its best tokens within whole pages (:func:`kvlab.methods._paged.scorer_pages`: the budget's pages, raised to
hold what the method always keeps; one count for every layer, or per layer with one KV-cache group each where
the method's budgets differ by layer, PyramidKV), moved into the request's first pages, and the scheduler
frees the rest. kvlab's own engine keeps the same tokens with the method's ``page`` set to vLLM's page size.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kvlab.errors import check
from kvlab.methods import _scoring as S
from kvlab.methods._paged import kept_full_pages, scorer_pages
from kvlab.methods.base import Method, PrefillContext
from kvlab.methods.scorer import ScorerMethod, score_prompt
from kvlab.vllm.methods.base import BUDGET_KEYS, adapter, budget_given
from kvlab.vllm.methods.kv_compress import PrefillEviction


@adapter(ScorerMethod)
class ScorerAdapter(PrefillEviction):
    """A scorer press at the end of each prompt, in whole pages of vLLM's page size (the method's ``page``);
    TOVA and H2O with ``decode_evict=false`` (with it, :mod:`kvlab.vllm.methods.held`)."""

    @classmethod
    def why_not(cls, method_cls: type[Method]) -> str | None:
        if method_cls.per_head_budgets:  # AdaKV
            return ("its per-head budgets need per-head block tables; vLLM 0.32 keeps one per request and KV-cache "
                    "group, and a page holds every KV head of a layer")
        return None

    @classmethod
    def params(cls, section: dict[str, Any], page_size: int) -> dict[str, Any]:
        page = section.setdefault("page", page_size)
        check(page == page_size, f"page is vLLM's page size inside vLLM: give page={page_size} or leave it out")
        return super().params(section, page_size)

    def validate(self) -> None:
        check(budget_given(self.method),
              f"{self.method.name} needs a budget: give budget (fraction kept, e.g. 0.25), ratio or budget_tokens")

    def describe(self) -> dict[str, Any]:
        skip = {*BUDGET_KEYS, "page"}
        return {f.name: getattr(self.method, f.name) for f in self.method.parameters() if f.name not in skip}

    def group_per_layer(self) -> str | None:
        return f"{self.method.name}'s per-layer budgets" if self.method.layer_budgets else None

    def observed(self) -> int:
        return self.method.observation_window()

    def pages(self, n: int) -> int | None:
        method, page = self.method, self.page_size
        if not S.compresses(method) or n <= self.observed():
            return None
        if method.budget_tokens is not None and method.budget_tokens >= n:
            return None
        m = kept_full_pages(n, method.tokens_kept(n), page, 0, 0)
        return m if m < n // page else None

    def scores(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
               n: int) -> torch.Tensor:
        """The method's own scores of the prompt's full pages ``[H, F]``, from a fresh copy of the method (its
        once-per-prompt state, e.g. H2O's capacity, is the prompt's own)."""
        scores = score_prompt(copy.deepcopy(self.method), layer, keys, values, queries, scale, prepare=True)
        return scores[:, : n // self.page_size * self.page_size].float()

    def layer_pages(self, scores: list[torch.Tensor], n: int) -> list[int]:
        method = self.method
        if method.layer_budgets:
            ctx = PrefillContext(context_lengths=torch.tensor([n]), queries={}, scaling=1.0, num_query_heads=0)
            kept = [int(method.kept(i, len(scores), ctx)[0]) for i in range(len(scores))]
        else:
            kept = [method.tokens_kept(n)] * len(scores)
        return scorer_pages(scores, n, kept, self.page_size, method.layer_budgets)
