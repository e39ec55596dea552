"""kvlab: KV-cache compression for LLM inference, and the experiments that test it."""

from kvlab.errors import KVLabError
from kvlab.generation import decode, generate, prefill
from kvlab.methods import METHODS, Method, make_method
from kvlab.models.loader import load

__all__ = ["KVLabError", "METHODS", "Method", "decode", "generate", "load", "make_method", "prefill"]
__version__ = "0.1.0"
