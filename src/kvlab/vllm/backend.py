"""kvlab's attention backend for vLLM 0.32: vLLM's own CPU backend, plus a routing method (block-route) on
decode steps and an eviction method's reads.

:class:`KVLabCPUAttentionBackend` replaces ``CPU_ATTN`` (vLLM's CPU platform ignores
``--attention-backend`` and always picks ``CPU_ATTN``; see ``kvlab.vllm.plugin``). Without a ``"kvlab"``
entry in ``--additional-config`` (or with an inert method, ``full``) it hands back vLLM's own builder and
implementation classes, so a plain engine runs exactly vLLM's code. With a method that routes (its adapter,
:mod:`kvlab.vllm.methods`, plans the step, tells routed layers apart, keeps page summaries and selects):

- :class:`KVLabCPUMetadataBuilder` asks vLLM to order decode requests first (``reorder_batch_threshold
  = 1``), builds vLLM's metadata, then kvlab's :class:`~kvlab.vllm.routing.StepPlan` for the step and
  the kernel's scheduler metadata for the compacted ``seq_lens``: all host work, once per step.
- :class:`KVLabCPUAttentionImpl` updates the layer's page summaries from the pages vLLM just wrote,
  then, on a routed layer of a step with decodes, selects pages per request and calls vLLM's forward
  (its ``cpu_attention_with_kv_cache`` kernel) with the compacted block table. Prefill rows of the same
  batch keep their block table and attend densely in the same kernel call.

With an eviction method (``streaming``, ``kv-compress``; :mod:`kvlab.vllm.eviction`) the builder asks
the worker's eviction records (and through them the method's adapter) for the step's plan and hands
vLLM's own builder a block table and ``seq_lens`` in which compressed requests read only what they kept,
and the layer, after vLLM's kernel, hands its call to the adapter: streaming replaces its rows' output
with attention over their sinks and window, kv-compress scores the prompts that end in this step. The
scheduler side of eviction (which blocks go back to vLLM's pool) is :mod:`kvlab.vllm.engine`, the one
module that touches vLLM's engine internals.

The CUDA variant (:class:`KVLabTritonAttentionBackend`, registered as ``CUSTOM``) wraps vLLM's Triton
backend the same way, for block-route only. It is written against vLLM 0.32's ``triton_attn.py`` but has
not run: no GPU was available where it was written (docs/vllm.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar

import torch
from vllm.config import get_current_vllm_config, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from kvlab.errors import check
from kvlab.vllm import config as kvconfig
from kvlab.vllm.methods import ROUTES
from kvlab.vllm.routing import PageSummaries, StepPlan, compact_block_table

logger = init_logger("vllm.kvlab")  # under "vllm." so vLLM's log handler prints it
RECORD_ENV = "KVLAB_VLLM_RECORD"  # diagnostic: keep every decode selection (tests read them)
_logged = False


def engine_config(vllm_config: Any | None = None, log: bool = False) -> kvconfig.ServeConfig | None:
    """This engine's kvlab configuration when the plugin acts; ``None`` for an inert method or no kvlab entry.

    ``log``: log the configuration once per process (the startup line naming the kvlab method).
    """
    vllm_config = vllm_config if vllm_config is not None else get_current_vllm_config_or_none()
    if vllm_config is None:
        return None
    cfg = kvconfig.from_vllm_config(vllm_config, heads_apart=heads_apart())
    global _logged
    if log and cfg is not None and not _logged:
        _logged = True
        logger.info(cfg.log_line())
    return cfg if cfg is not None and cfg.active else None


def heads_apart() -> bool:
    """Whether this platform's kvlab backend reads each KV head's own pages: the CPU backend calls vLLM's kernel
    once per KV head; the CUDA variant reads one page list per request."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` -> 7."""
    numbers = [int(part) for part in layer_name.split(".") if part.isdigit()]
    check(len(numbers) >= 1, f"cannot tell the layer index of attention layer {layer_name!r}")
    return numbers[0]


# ---------------------------------------------------------------- metadata: the host plan of a step
@dataclasses.dataclass
class KVLabCPUMetadata(CPUAttentionMetadata):
    kvlab_plan: StepPlan | None = None
    kvlab_scheduler_metadata: torch.Tensor | None = None
    kvlab_evict: Any = None  # kvlab.vllm.eviction.EvictStep
    kvlab_group: int = 0


class KVLabPlanMixin:
    """The step plan, shared by the CPU and CUDA builders."""

    reorder_batch_threshold: ClassVar[int | None] = 1  # decodes first, so they are rows 0 .. nd - 1

    def _kvlab_init(self, vllm_config: Any) -> None:
        self.kvlab = kvconfig.from_vllm_config(vllm_config, heads_apart=heads_apart())
        if self.kvlab is not None:
            check(vllm_config.cache_config.cache_dtype == "auto",
                  f"kvlab block-route reads keys to score pages: --kv-cache-dtype must be auto, "
                  f"got {vllm_config.cache_config.cache_dtype}")

    def _kvlab_plan(self, common: Any, block_table: torch.Tensor, seq_lens: torch.Tensor, kv_heads: int
                    ) -> StepPlan | None:
        if self.kvlab is None or self.kvlab.adapter.role != ROUTES:
            return None
        num_decodes, _, _, _ = split_decodes_and_prefills(common, decode_threshold=1)
        reqs = common.num_reqs
        return self.kvlab.adapter.step_plan(block_table[:reqs], seq_lens[:reqs], num_decodes, kv_heads)


class KVLabCPUMetadataBuilder(KVLabPlanMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._kvlab_init(vllm_config)
        self.kvlab_evict = None
        if self.kvlab is not None and self.kvlab.active:
            check(self.window_size == -1, f"kvlab {self.kvlab.method.name} inside vLLM runs on full-attention layers "
                                          "only; this model has sliding-window layers in the same KV group")
        if self.kvlab is not None and self.kvlab.evicts:
            from kvlab.vllm import engine

            self.kvlab_evict = engine.worker_state()
            check(self.kvlab_evict is not None,
                  f"kvlab {self.kvlab.method.name} frees vLLM's KV blocks from the worker and the scheduler: start "
                  f"vLLM with --worker-cls {engine.WORKER_CLS} --scheduler-cls {engine.SCHEDULER_CLS} "
                  "(kvlab serve does)")

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        if self.kvlab_evict is not None:
            return self._kvlab_build_eviction(common_prefix_len, common_attn_metadata, fast_build)
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = self._kvlab_plan(common_attn_metadata, common_attn_metadata.block_table_tensor,
                                common_attn_metadata.seq_lens, self.num_kv_heads)
        if plan is None:
            return md
        from vllm import _custom_ops as ops
        from vllm import envs

        groups = plan.head_groups  # one kernel call per group of KV heads, on its slice of the cache
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=common_attn_metadata.num_reqs, num_heads=self.num_heads // groups,
            num_kv_heads=self.num_kv_heads // groups,
            head_dim=self.head_dim, seq_lens=plan.seq_lens, dtype=self.dtype, query_start_loc=md.query_start_loc,
            causal=md.causal, sliding_window_size=self.window_size, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=md.dynamic_causal,
            kv_cache_dtype=self.kv_cache_dtype)
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return KVLabCPUMetadata(**fields, kvlab_plan=plan, kvlab_scheduler_metadata=sched)

    def _kvlab_build_eviction(self, common_prefix_len: int, common: Any, fast_build: bool) -> Any:
        """vLLM's metadata over the compacted block table and ``seq_lens``, with the step's eviction plan."""
        state = self.kvlab_evict
        reqs = common.num_reqs
        rows = state.rows(reqs, common.seq_lens, common.query_start_loc_cpu)
        if rows is None:  # a warm-up run: no requests behind the rows
            return super().build(common_prefix_len, common, fast_build)
        group = state.group_of.get(self.layer_names[0], 0)
        table, seq_lens = common.block_table_tensor, common.seq_lens
        step, read_table, read_seq = state.plan(rows, table[:reqs], seq_lens[:reqs], group)
        if step is None:
            return super().build(common_prefix_len, common, fast_build)
        full_table, full_seq = table.clone(), seq_lens.clone()
        full_table[:reqs], full_seq[:reqs] = read_table, read_seq
        read = dataclasses.replace(common, block_table_tensor=full_table, seq_lens=full_seq,
                                   max_seq_len=int(full_seq[:reqs].max()))
        md = super().build(common_prefix_len, read, fast_build)
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return KVLabCPUMetadata(**fields, kvlab_evict=step, kvlab_group=group)


# ---------------------------------------------------------------- the layer: summaries, selection
class KVLabImplMixin:
    """Per layer: keep the page summaries current and turn a step plan into this layer's read."""

    def _kvlab_init(self) -> None:
        vllm_config = get_current_vllm_config()
        self.kvlab = engine_config(vllm_config)
        # All of the model's layers (layer indices are global, also under pipeline parallelism).
        self.kvlab_num_layers = int(vllm_config.model_config.hf_text_config.num_hidden_layers)
        self.kvlab_layer: int | None = None
        self.kvlab_dense = True
        self.kvlab_summaries: PageSummaries | None = None
        self.kvlab_selections: list[dict[str, Any]] | None = [] if os.environ.get(RECORD_ENV) else None

    def _kvlab_routes(self, layer: Any) -> bool:
        if self.kvlab is None or self.attn_type != AttentionType.DECODER or self.kvlab.adapter.role != ROUTES:
            return False
        if self.kvlab_layer is None:
            self.kvlab_layer = layer_index(layer.layer_name)
            self.kvlab_dense = not self.kvlab.adapter.routes_layer(self.kvlab_layer, self.kvlab_num_layers)
        return not self.kvlab_dense

    def _kvlab_update(self, layer: Any, key: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
        """Fold the keys vLLM just wrote into this layer's page summaries (routed layers only)."""
        if not self._kvlab_routes(layer) or kv_cache.numel() == 0:
            return
        num_blocks, kv_heads = kv_cache.shape[0], kv_cache.shape[1]
        if self.kvlab_summaries is None or self.kvlab_summaries.num_blocks != num_blocks:
            self.kvlab_summaries = self.kvlab.adapter.summaries(num_blocks, kv_heads, self.head_size,
                                                                kv_cache.device, key.dtype)
        self.kvlab_summaries.update(key[: slot_mapping.shape[0]], slot_mapping)

    def _kvlab_metadata(self, query: torch.Tensor, md: Any) -> list[Any]:
        """``md`` with this layer's compacted pages for the step's decode requests, one per group of KV heads
        (``plan.head_groups``: the group's kernel call reads its slice of the query heads and the cache)."""
        plan: StepPlan = md.kvlab_plan
        nd = plan.num_decodes
        physical, logical = self.kvlab.adapter.select(query[:nd], plan, self.kvlab_summaries)
        if self.kvlab_selections is not None:
            k = plan.k.tolist()
            per_group = [[row[:n] for row in rows] for rows, n in zip(logical.tolist(), k, strict=True)]
            self.kvlab_selections.append({
                "layer": self.kvlab_layer, "requests": int(md.query_start_loc.shape[0] - 1),
                "seq_lens": md.seq_lens[:nd].tolist(), "k": k, "read_seq_lens": plan.seq_lens[:nd].tolist(),
                "pages": [rows[0] for rows in per_group] if plan.head_groups == 1 else per_group})
        return [self._kvlab_replace(md, compact_block_table(md.block_table, physical[:, g]), plan)
                for g in range(plan.head_groups)]

    def _kvlab_replace(self, md: Any, table: torch.Tensor, plan: StepPlan) -> Any:
        return dataclasses.replace(md, block_table=table, seq_lens=plan.seq_lens,
                                   scheduler_metadata=md.kvlab_scheduler_metadata)


class KVLabCPUAttentionImpl(KVLabImplMixin, CPUAttentionBackendImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kvlab_init()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self._kvlab_update(layer, key, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if isinstance(attn_metadata, KVLabCPUMetadata) and self._kvlab_routes(layer):
            reads = self._kvlab_metadata(query, attn_metadata)
            if len(reads) > 1:
                return self._kvlab_per_group(layer, query, key, value, kv_cache, reads, output)
            attn_metadata = reads[0]
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        if isinstance(attn_metadata, KVLabCPUMetadata) and attn_metadata.kvlab_evict is not None:
            self._kvlab_evict(layer, query, kv_cache, attn_metadata, out)
        return out

    def _kvlab_per_group(self, layer, query, key, value, kv_cache, reads, output) -> torch.Tensor:
        """vLLM's kernel once per group of KV heads, each on its slices of the query heads and the cache (the
        kernel reads a strided head slice as it is) with the group's own block table."""
        groups, tokens = len(reads), query.shape[0]
        hq, hk = query.shape[1] // groups, kv_cache.shape[1] // groups
        out = output.view(tokens, query.shape[1], -1)
        part = torch.empty((tokens, hq * out.shape[2]) if output.dim() == 2 else (tokens, hq, out.shape[2]),
                           dtype=output.dtype, device=output.device)
        for g, md in enumerate(reads):
            super().forward(layer, query[:, g * hq:(g + 1) * hq].contiguous(), key, value,
                            kv_cache[:, g * hk:(g + 1) * hk], md, part)
            out[:, g * hq:(g + 1) * hq] = part.view(tokens, hq, -1)
        return output

    def _kvlab_evict(self, layer, query, kv_cache, md, out) -> None:
        """After vLLM's kernel: the method's adapter reads the layer's call (streaming rows attend over their
        sinks and window; kv-compress scores the prompts that end in this step; :mod:`kvlab.vllm.eviction`)."""
        from kvlab.vllm import page_layout
        from kvlab.vllm.engine import worker_state
        from kvlab.vllm.eviction import LayerCall

        if self.kvlab_layer is None:
            self.kvlab_layer = layer_index(layer.layer_name)
        maps = page_layout.page_maps(kv_cache.dtype, kv_cache.shape[2], self.head_size, layer.isa)
        call = LayerCall(name=layer.layer_name, layer=self.kvlab_layer, group=md.kvlab_group, query=query,
                         kv_cache=kv_cache, maps=maps, scale=self.scale, output=out)
        worker_state().after_attention(md.kvlab_evict, call)


class KVLabCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with kvlab's builder and layer when the engine's config asks for a kvlab method."""

    @staticmethod
    def get_impl_cls() -> type:
        return KVLabCPUAttentionImpl if engine_config() is not None else CPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type:
        return KVLabCPUMetadataBuilder if engine_config(log=True) is not None else CPUAttentionMetadataBuilder


# ---------------------------------------------------------------- CUDA (written, not run here)
@functools.cache
def _triton_classes() -> tuple[type, type, type]:
    """The CUDA variant over vLLM's Triton backend (imported only on CUDA)."""
    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionBackend,
        TritonAttentionImpl,
        TritonAttentionMetadata,
        TritonAttentionMetadataBuilder,
    )

    @dataclasses.dataclass
    class KVLabTritonMetadata(TritonAttentionMetadata):
        kvlab_plan: StepPlan | None = None

    class KVLabTritonMetadataBuilder(KVLabPlanMixin, TritonAttentionMetadataBuilder):
        # The compacted block table is rebuilt per layer with a width that follows the budget: no CUDA graphs.
        _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self._kvlab_init(vllm_config)

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            md = super().build(common_prefix_len, common_attn_metadata, fast_build)
            reqs = common_attn_metadata.num_reqs
            table = common_attn_metadata.block_table_tensor[:reqs]
            # One host copy of the step's lengths and pages, not one per layer.
            plan = self._kvlab_plan(common_attn_metadata, table.cpu(), common_attn_metadata.seq_lens[:reqs].cpu(),
                                    self.num_heads_kv)
            if plan is None:
                return md
            device = table.device
            for name in ("pages", "sub_valid", "page_valid", "forced", "keep"):
                setattr(plan, name, getattr(plan, name).to(device, non_blocking=True))
            plan.seq_lens = plan.seq_lens.to(device=device, dtype=md.seq_lens.dtype, non_blocking=True)
            fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(TritonAttentionMetadata)}
            return KVLabTritonMetadata(**fields, kvlab_plan=plan)

    class KVLabTritonAttentionImpl(KVLabImplMixin, TritonAttentionImpl):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kvlab_init()

        def _kvlab_replace(self, md, table, plan):
            return dataclasses.replace(md, block_table=table, seq_lens=plan.seq_lens)

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            self._kvlab_update(layer, key, kv_cache, slot_mapping)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            if isinstance(attn_metadata, KVLabTritonMetadata) and self._kvlab_routes(layer):
                attn_metadata = self._kvlab_metadata(query, attn_metadata)[0]
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)

    class KVLabTritonAttentionBackend(TritonAttentionBackend):
        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls() -> type:
            return KVLabTritonAttentionImpl if engine_config() is not None else TritonAttentionImpl

        @staticmethod
        def get_builder_cls() -> type:
            return KVLabTritonMetadataBuilder if engine_config(log=True) is not None else TritonAttentionMetadataBuilder

    return KVLabTritonAttentionBackend, KVLabTritonAttentionImpl, KVLabTritonMetadataBuilder


def __getattr__(name: str) -> Any:
    # vLLM resolves the CUSTOM backend by the qualified name kvlab.vllm.backend.KVLabTritonAttentionBackend.
    if name == "KVLabTritonAttentionBackend":
        return _triton_classes()[0]
    raise AttributeError(name)


# ---------------------------------------------------------------- diagnostics (tests, `LLM.apply_model`)
def recorded_selections(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Every decode selection the model's kvlab layers recorded (``KVLAB_VLLM_RECORD=1``); use as
    ``llm.apply_model(recorded_selections)``."""
    out: list[dict[str, Any]] = []
    for module in model.modules():
        impl = getattr(module, "impl", None)
        out.extend(getattr(impl, "kvlab_selections", None) or [])
    return out



def summary_snapshot(model: torch.nn.Module) -> list[dict[str, Any]]:
    """For every routed layer, the pages that hold a summary: their raw cache blocks (in the layout of
    vLLM's kernel, ``isa``) and their summaries, so a test can recompute one from the other
    (``llm.apply_model(summary_snapshot)``)."""
    out = []
    for module in model.modules():
        impl = getattr(module, "impl", None)
        summaries = getattr(impl, "kvlab_summaries", None)
        if summaries is None:
            continue
        kv_cache = module.kv_cache[0] if isinstance(module.kv_cache, list) else module.kv_cache
        tokens = summaries.tokens()
        pages = torch.nonzero(tokens > 0).flatten()
        entry = {"layer": impl.kvlab_layer, "isa": getattr(module, "isa", None), "score_block": summaries.score_block,
                 "pages": pages, "tokens": tokens[pages].clone(), "blocks": kv_cache[pages].clone(),
                 "count": summaries.view("count")[pages].clone()}
        for name in (("kmin", "kmax") if summaries.bounds else ("ksum",)):
            entry[name] = summaries.view(name)[pages].clone()
        out.append(entry)
    return out


def reset_records(model: torch.nn.Module) -> list[str]:
    """Forget recorded selections and every page summary (only for a test that then sends prompts no
    earlier request shares: a prefix-cache hit would find its pages unsummarised); returns the attention
    implementation class of every layer, so a test can see which backend ran."""
    classes = []
    for module in model.modules():
        impl = getattr(module, "impl", None)
        if impl is None:
            continue
        classes.append(f"{type(impl).__module__}.{type(impl).__qualname__}")
        if getattr(impl, "kvlab_selections", None) is not None:
            impl.kvlab_selections.clear()
        if getattr(impl, "kvlab_summaries", None) is not None:  # the next write to a page starts it afresh
            summaries = impl.kvlab_summaries
            with torch.inference_mode():  # the engine made them in inference mode
                for name in ("ksum", "kmin", "kmax", "count"):
                    if hasattr(summaries, name):
                        getattr(summaries, name).fill_({"kmin": torch.inf, "kmax": -torch.inf}.get(name, 0))
    return classes
