"""Attention over the store: one entry point (:func:`attend`: a layer's override, else Triton on CUDA,
else the torch path), the plans methods build, and the read lists the kernels take."""

from kvlab.attention.dispatch import attend
from kvlab.attention.plans import ReadPlan

__all__ = ["ReadPlan", "attend"]
