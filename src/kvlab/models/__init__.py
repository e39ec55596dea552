"""Models: built-in GGUF models, any transformers decoder, random-weight shapes."""

from kvlab.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL
from kvlab.models.loader import load
from kvlab.models.shapes import RANDOM_SHAPES

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "RANDOM_SHAPES", "load"]
