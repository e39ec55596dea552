"""Attention over the store: the torch path (CPU, reference)."""

from kvlab.attention.plans import ReadPlan
from kvlab.attention.torch_attention import attend

__all__ = ["ReadPlan", "attend"]
