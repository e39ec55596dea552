"""``block-route`` inside vLLM: kvlab's attention backend picks, per decode step and layer, the pages vLLM's
own paged kernel reads (:mod:`kvlab.vllm.routing`: page summaries after Quest, arXiv 2406.10774, or MoBA's
centroids, arXiv 2502.13189, over LServe's sub-pages, arXiv 2502.14866; one plan per step; one selection
per layer). The whole cache is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlab.errors import KVLabError, check
from kvlab.methods.block_route import BlockRoute
from kvlab.vllm.methods.base import ROUTES, Adapter, adapter, budget_given
from kvlab.vllm.routing import PageSummaries, StepPlan, plan_step, select_pages


@adapter(BlockRoute)
class BlockRouteAdapter(Adapter):
    """A page is one of vLLM's KV blocks: block-route's ``block_size`` is vLLM's page size."""

    role = ROUTES
    # kvlab's own choice (the centroid, per KV head: `options`) on 32-token pages, the smallest vLLM's CPU kernel
    # reads, scored in sub-pages of 16 tokens; one sink page and the newest. docs/vllm.md ("Pages per request or
    # per KV head"): at 1/8 it finds vanilla's 4 needles of 4 at 16K x 4, and on RULER (niah_multikey_2, vt) it
    # scores within one sample in six of kvlab's own block-route; Quest's bound per request, the earlier
    # default on 128-token pages, found 3 needles and scored 0 on both tasks.
    defaults = {"local_blocks": 1, "score_block": 16}
    page_tokens = 32
    fixed = {"refresh": 1, "record_recall": False}
    # per_head: every KV head chooses its own pages (one kernel call per KV head, on its slice of the cache),
    # as kvlab's own block-route does; false: one page list per request and layer, scores summed over heads.
    options = {"per_head": True}

    @classmethod
    def backend_options(cls, given: dict[str, Any], heads_apart: bool) -> dict[str, Any]:
        if heads_apart:
            return given
        check(not given.get("per_head", False),
              "block-route per_head=true runs on vLLM's CPU backend; on CUDA pages are chosen per request")
        return {**given, "per_head": False}

    @classmethod
    def params(cls, section: dict[str, Any], page_size: int) -> dict[str, Any]:
        if "block_size" in section:
            check(section.pop("block_size") == page_size,
                  f"block-route reads vLLM's pages: block_size must equal vLLM's page size (--block-size {page_size})")
        params = {**super().params(section, page_size), "block_size": page_size}
        check(page_size & (page_size - 1) == 0,
              f"block-route needs a power-of-two page size (32, 64, 128 or 256), got --block-size {page_size}")
        sb = params.get("score_block")
        if isinstance(sb, int) and sb >= 1 and page_size % sb != 0:
            raise KVLabError(f"score_block {sb} does not divide the page size {page_size}; "
                             f"allowed: a power of two from 1 to {page_size}")
        return params

    def validate(self) -> None:
        check(budget_given(self.method),
              "block-route needs a budget: give budget (fraction read, e.g. 0.125), ratio or budget_tokens")

    def describe(self) -> dict[str, Any]:
        m = self.method
        return {"score": m.score, "score_block": m._sub, "sink_blocks": m.sink_blocks, "local_blocks": m.local_blocks,
                "dense_layers": m.dense_layers, "per_head": self.option["per_head"]}

    def check_model(self, num_layers: int) -> None:
        self.method.resolve_dense_layers(num_layers)

    def head_groups(self, kv_heads: int) -> int:
        return kv_heads if self.option["per_head"] else 1

    def step_plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int, kv_heads: int
                  ) -> StepPlan | None:
        return plan_step(self.method, block_table, seq_lens, num_decodes, self.page_size, self.method._sub,
                         self.head_groups(kv_heads))

    def routes_layer(self, layer: int, num_layers: int) -> bool:
        return layer not in self.method.resolve_dense_layers(num_layers)

    def summaries(self, num_blocks: int, kv_heads: int, head_size: int, device: torch.device,
                  dtype: torch.dtype) -> PageSummaries:
        return PageSummaries(num_blocks, self.page_size, self.method._sub, kv_heads, head_size,
                             bounds=self.method.score == "bound", device=device, dtype=dtype)

    def select(self, query: torch.Tensor, plan: StepPlan, summaries: PageSummaries
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return select_pages(query, plan, summaries)
