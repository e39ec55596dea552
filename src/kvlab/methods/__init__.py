"""kvlab's methods: one small dataclass per file, registered by name in :data:`METHODS`."""

from kvlab.methods import full, streaming  # noqa: F401  (registration)
from kvlab.methods.base import METHODS, Method, PrefillContext, StepContext, make_method, register

__all__ = ["METHODS", "Method", "PrefillContext", "StepContext", "make_method", "register"]
