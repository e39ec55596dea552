"""The one module where kvlab's eviction meets vLLM's engine internals (vLLM 0.32.x only; docs/vllm.md).

Nothing here is a monkeypatch: every piece is a subclass vLLM lets a user name, or a registration
through vLLM's registry. Imported only when a kvlab eviction method is configured, and it refuses any
other vLLM version at import.

- :class:`KVLabEvictSpec` / :class:`KVLabEvictManager`: a ``FullAttentionSpec`` that carries the kvlab
  configuration, registered with ``vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry`` to a
  ``FullAttentionManager`` subclass whose ``remove_skipped_blocks`` (the scheduler's hook to free blocks
  nobody reads any more, called by ``KVCacheManager.allocate_slots``) frees the range the method's adapter
  names (:meth:`kvlab.vllm.methods.base.Adapter.free_range`): streaming's gap between the sink pages and
  the window, kv-compress's pages ``[m, n // page)`` once the worker reported ``m``. When the adapter wants
  a KV-cache group per layer (kv-compress ``rates="layer"``) every layer's spec is its own
  (``layer_slot``), so vLLM makes one block table per layer and each layer frees its own pages.
- :class:`KVLabCPUWorker` (``--worker-cls``): swaps each layer's spec for the kvlab one
  (``get_kv_cache_spec``), holds the eviction records (:class:`kvlab.vllm.eviction.WorkerState`), which
  read each batch row's prompt length and request id from the model runner's ``input_batch``
  (``CommonAttentionMetadata`` has neither), forgets finished/preempted/resumed requests, lets the adapter
  finish the step after each forward (kv-compress's choice) and reports it on the ``ModelRunnerOutput``.
- :class:`KVLabScheduler` (``--scheduler-cls``): hands the reported kept pages to the group managers
  before vLLM processes the step's output.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from typing import Any

from kvlab.errors import check
from kvlab.vllm import config as kvconfig
from kvlab.vllm.plugin import check_eviction_version

REPORT = "kvlab_kept_pages"  # the attribute the worker adds to ModelRunnerOutput: {request: {group: pages}}
WORKER_CLS, SCHEDULER_CLS = kvconfig.WORKER_CLS, kvconfig.SCHEDULER_CLS


check_eviction_version()

import torch  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, register_all_kvcache_specs  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402
from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402

from kvlab.vllm import eviction  # noqa: E402
from kvlab.vllm.methods import EVICTS, runnable  # noqa: E402

logger = init_logger("vllm.kvlab")


# ---------------------------------------------------------------- scheduler side: spec and manager
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVLabEvictSpec(FullAttentionSpec):
    """A full-attention layer whose KV blocks kvlab frees: ``kvlab`` is the engine's ``"kvlab"`` entry (JSON)."""

    kvlab: str = "{}"
    layer_slot: int = -1  # >= 0 (rates="layer"): the layer is a KV-cache group of its own

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, Any]) -> bool:
        return self.layer_slot < 0 and super().is_uniform_with_collection(kv_cache_specs)

    @classmethod
    def merge(cls, specs: list[Any]) -> Any:
        # FullAttentionSpec.merge rebuilds cls(...) without a subclass's fields; the layers of one group are
        # equal here. AssertionError is what vLLM's grouping catches to tell specs apart.
        if not all(spec == specs[0] for spec in specs[1:]):
            raise AssertionError("All layers in the same KV cache group must be the same.")
        return copy.deepcopy(specs[0])

    @property
    def prefix_cacheable(self) -> bool:
        # A method that rewrites a request's first blocks after they were filled: their hashes would lie.
        return spec_config(self.kvlab, self.block_size).adapter.prefix_cache_off() is None


@functools.cache
def spec_config(kvlab: str, page_size: int) -> kvconfig.ServeConfig:
    return kvconfig.parse(json.loads(kvlab), page_size)


class KVLabEvictManager(FullAttentionManager):
    """``FullAttentionManager`` that frees the blocks kvlab's eviction no longer reads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.kv_cache_spec
        self.kvlab = spec_config(spec.kvlab, spec.block_size)
        self.kvlab_kept: dict[str, int] = {}  # request -> pages kept, as the worker reported (kv-compress)

    def pop_blocks_for_free(self, request_id: str) -> list[Any]:
        self.kvlab_kept.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        n = num_prompt_tokens
        if n is None or processed_computed_tokens < n or request_id not in self.req_to_blocks:
            return
        free = self.kvlab.adapter.free_range(n, processed_computed_tokens, self.kvlab_kept.get(request_id))
        if free is not None:
            self._remove_blocks_in_range(request_id, *free)


def register_spec() -> None:
    """Register the spec with vLLM's registry (idempotent). The registry fills in vLLM's own specs only
    while it is empty (``KVCacheSpecRegistry._ensure_registered``): registering first would leave
    ``FullAttentionSpec`` without a manager, so vLLM's own are registered first (re-registering the same
    entries is allowed)."""
    from vllm.config import get_current_vllm_config_or_none

    register_all_kvcache_specs(get_current_vllm_config_or_none())
    KVCacheSpecRegistry.register(KVLabEvictSpec, KVLabEvictManager, uniform_type_base_spec=FullAttentionSpec)


register_spec()  # in the engine core this runs when the worker's pickled specs are loaded


def eviction_config(vllm_config: Any) -> kvconfig.ServeConfig:
    cfg = kvconfig.from_vllm_config(vllm_config)
    check(cfg is not None and cfg.evicts, f"{WORKER_CLS} and {SCHEDULER_CLS} serve kvlab's eviction methods "
                                          f"({', '.join(runnable(EVICTS))}); the kvlab entry names none")
    refuse_unsupported(vllm_config, cfg)
    return cfg


def refuse_unsupported(vllm_config: Any, cfg: kvconfig.ServeConfig) -> None:
    """One line for every engine setting kvlab eviction does not run with."""
    par, cache, sched = vllm_config.parallel_config, vllm_config.cache_config, vllm_config.scheduler_config
    name = cfg.method.name
    cfg.adapter.check_ranks(par.tensor_parallel_size)
    check(par.pipeline_parallel_size == 1, f"kvlab {name} inside vLLM runs with pipeline parallel size 1 (tensor "
                                           "parallel is served)")
    check(vllm_config.speculative_config is None, f"kvlab {name} inside vLLM does not run with speculative decoding")
    check(cache.cache_dtype == "auto", f"kvlab {name} moves and reads KV pages: --kv-cache-dtype must be auto, "
                                       f"got {cache.cache_dtype}")
    per_layer = cfg.adapter.group_per_layer()
    check(not (per_layer and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager),
          f"{name} {per_layer} gives every layer its own block table: it needs vLLM's hybrid KV cache manager "
          "(drop --disable-hybrid-kv-cache-manager)")
    check(str(par.worker_cls).endswith("KVLabCPUWorker") or isinstance(par.worker_cls, type),
          f"kvlab {name} needs --worker-cls {WORKER_CLS}")
    scheduler_cls = sched.scheduler_cls
    check(scheduler_cls is not None and "KVLabScheduler" in str(scheduler_cls),
          f"kvlab {name} needs --scheduler-cls {SCHEDULER_CLS}")
    check(not vllm_config.use_v2_model_runner, f"kvlab {name} runs on vLLM's V1 model runner (unset "
                                               "VLLM_USE_V2_MODEL_RUNNER)")


# ---------------------------------------------------------------- worker side
class KVLabCPUWorker(CPUWorker):
    """vLLM's CPU worker with kvlab's eviction records (``--worker-cls kvlab.vllm.engine.KVLabCPUWorker``)."""

    kvlab_state: eviction.WorkerState | None = None

    def init_device(self) -> None:
        super().init_device()
        cfg = eviction_config(self.vllm_config)
        KVLabCPUWorker.kvlab_state = state = eviction.WorkerState(cfg.adapter, self.model_runner)
        if self.vllm_config.parallel_config.tensor_parallel_size > 1:
            state.ranks = TensorRanks()
        logger.info("kvlab: %s frees vLLM's KV blocks (%s)", cfg.method.name, cfg.log_line())
        why = cfg.adapter.prefix_cache_off()
        if why is not None:
            logger.info("kvlab: prefix caching is off for %s: it %s, so their hashes would no longer match their "
                        "content", cfg.method.name, why)

    def get_kv_cache_spec(self) -> dict[str, Any]:
        specs = super().get_kv_cache_spec()
        cfg = eviction_config(self.vllm_config)
        body = json.dumps(cfg.additional_config()[kvconfig.CONFIG_KEY], sort_keys=True)
        out = {}
        for i, (name, spec) in enumerate(specs.items()):
            check(type(spec) is FullAttentionSpec and spec.sliding_window is None and not spec.non_causal,
                  f"kvlab {cfg.method.name} inside vLLM runs on full-attention decoder layers; layer {name} has "
                  f"{type(spec).__name__}" + (f" with a sliding window of {spec.sliding_window}"
                                              if getattr(spec, "sliding_window", None) else ""))
            fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
            out[name] = KVLabEvictSpec(**fields, kvlab=body, layer_slot=i if cfg.adapter.group_per_layer() else -1)
        return out

    def initialize_from_config(self, kv_cache_configs: Any) -> None:
        super().initialize_from_config(kv_cache_configs)
        state = KVLabCPUWorker.kvlab_state
        groups = self.model_runner.kv_cache_config.kv_cache_groups
        state.group_of = {name: g for g, group in enumerate(groups) for name in group.layer_names}
        state.num_layers = len(state.group_of)

    def execute_model(self, scheduler_output: Any) -> Any:
        state = KVLabCPUWorker.kvlab_state
        cached = scheduler_output.scheduled_cached_reqs
        state.forget(scheduler_output.finished_req_ids)
        state.forget(scheduler_output.preempted_req_ids)
        state.forget(cached.resumed_req_ids)
        out = super().execute_model(scheduler_output)
        if state.pending or state.ranks.size > 1:  # every rank every step: the ranks agree inside
            with torch.inference_mode():
                state.after_forward()
        state.agree()
        return self._kvlab_attach(out)

    def sample_tokens(self, grammar_output: Any) -> Any:
        return self._kvlab_attach(super().sample_tokens(grammar_output))

    def _kvlab_attach(self, out: Any) -> Any:
        state = KVLabCPUWorker.kvlab_state
        if out is None or not state.report:
            return out
        out = copy.copy(out)
        setattr(out, REPORT, state.take_report())
        return out


class TensorRanks(eviction.Ranks):
    """The tensor-parallel ranks of this worker (vLLM's TP group, its CPU process group)."""

    def __init__(self) -> None:
        from vllm.distributed.parallel_state import get_tp_group

        self.group = get_tp_group()
        self.size = self.group.world_size

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.group.cpu_group)
        return out


def worker_state() -> eviction.WorkerState | None:
    """The eviction records of this worker process (``None`` outside a :class:`KVLabCPUWorker`)."""
    return KVLabCPUWorker.kvlab_state


# ---------------------------------------------------------------- scheduler
class KVLabScheduler(Scheduler):
    """vLLM's scheduler, told which pages the worker emptied (kv-compress)
    (``--scheduler-cls kvlab.vllm.engine.KVLabScheduler``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        eviction_config(self.vllm_config)

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int, num_new_tokens: int) -> int:
        """vLLM's last cut of a request's tokens this step (running and waiting alike), cut again at the prompt's
        end: a preempted request is recomputed, prompt and outputs in one prefill, and its outputs must be
        recomputed against the cache the method left at the prompt's end, as they were first computed, not
        against the whole prompt (kvlab's methods act when a step ends the prompt)."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        return prompt_end_cut(request.num_prompt_tokens, num_computed_tokens, num_new_tokens)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        kept = getattr(model_runner_output, REPORT, None)
        if kept:
            managers = self.kv_cache_manager.coordinator.single_type_managers
            for req_id, per_group in kept.items():
                request = self.requests.get(req_id)
                if request is None or request.is_finished():
                    continue
                for group, pages in per_group.items():
                    managers[group].kvlab_kept[req_id] = pages
        return super().update_from_output(scheduler_output, model_runner_output)


def prompt_end_cut(prompt: int, computed: int, new: int) -> int:
    """Tokens to compute this step so that a step that ends the prompt ends there (a resumed request's
    prefill holds its outputs too)."""
    return prompt - computed if computed < prompt < computed + new else new


def kept_record(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Every prefill-end choice (kv-compress's) this worker made (``KVLAB_VLLM_RECORD=1``): prompt length, kept
    pages per KV-cache group, kept positions per layer and KV head; use as ``llm.apply_model(kept_record)``."""
    state = worker_state()
    return list(state.kept_log or []) if state is not None else []
