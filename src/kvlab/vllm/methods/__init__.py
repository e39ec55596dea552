"""One adapter per kvlab method inside vLLM, registered by the kvlab method class it serves
(:mod:`kvlab.vllm.methods.base`; docs/vllm.md, "Adding a method").

Imported here so that every process that reads a kvlab configuration has them all, and with them the
modules named in ``KVLAB_VLLM_ADAPTERS`` (comma-separated): adapters (and kvlab methods) that live outside
kvlab. vLLM starts its engine core and workers as fresh processes (spawned on the CPU), which inherit the
environment, not what the parent registered.
"""

import importlib
import os

from kvlab.vllm.methods import block_route, full, held, kv_compress, scorers, streaming  # noqa: F401  (registration)
from kvlab.vllm.methods.base import (
    ADAPTERS,
    EVICTS,
    INERT,
    ROUTES,
    WHY_NOT,
    Adapter,
    adapter,
    adapter_class,
    adapter_for,
    adapter_named,
    runnable,
    why_not,
)

ADAPTERS_ENV = "KVLAB_VLLM_ADAPTERS"

__all__ = ["ADAPTERS", "ADAPTERS_ENV", "EVICTS", "INERT", "ROUTES", "WHY_NOT", "Adapter", "adapter", "adapter_class",
           "adapter_for", "adapter_named", "runnable", "why_not"]

for _module in filter(None, (m.strip() for m in os.environ.get(ADAPTERS_ENV, "").split(","))):
    importlib.import_module(_module)
