"""kvlab's methods: one small dataclass per file, registered by name in :data:`METHODS`.

Imported here in report order: the tables list the methods by family (:data:`~kvlab.methods.base.FAMILIES`),
each family in this order (:func:`~kvlab.methods.base.by_family`).
"""

from kvlab.methods import (  # noqa: F401, I001  (registration, in report order)
    full,
    block_route,
    cluster_route,
    oracles,
    streaming,
    kv_compress,
    snapkv,
    pyramidkv,
    h2o,
    tova,
    knorm,
    random_evict,
    ada_snapkv,
    low_rank,
    quantize,
    local_global,
    cross_layer,
)
from kvlab.methods.base import FAMILIES, METHODS, Method, PrefillContext, StepContext, by_family, make_method, register

__all__ = ["FAMILIES", "METHODS", "Method", "PrefillContext", "StepContext", "by_family", "make_method", "register"]
