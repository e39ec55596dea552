"""kvlab's methods: one small dataclass per file, registered by name in :data:`METHODS`."""

from kvlab.methods import (  # noqa: F401  (registration)
    ada_snapkv,
    block_route,
    cluster_route,
    cross_layer,
    full,
    h2o,
    knorm,
    kv_compress,
    local_global,
    low_rank,
    oracles,
    pyramidkv,
    quantize,
    random_evict,
    snapkv,
    streaming,
    tova,
)
from kvlab.methods.base import METHODS, Method, PrefillContext, StepContext, make_method, register

__all__ = ["METHODS", "Method", "PrefillContext", "StepContext", "make_method", "register"]
