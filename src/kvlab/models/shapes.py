"""Model shapes for random-weight models (``random:NAME``) and for the memory calculator.

The numbers are the public configs of each model family; weights are random, so these models are
for latency and memory work, never for quality.
"""

from __future__ import annotations

from typing import Any

# Tiny shapes for fast tests: every supported architecture, GQA where the family has it.
_TINY: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
    ),
    "tiny-mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=256, max_position_embeddings=4096,
        sliding_window=None,
    ),
    "tiny-gemma3": dict(
        model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=256,
        max_position_embeddings=4096, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
}

# Full-size shapes (public configs).
_FULL: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0,
    ),
    "llama-3.1-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None,
    ),
    "gemma-3-4b": dict(
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
        max_position_embeddings=131072, sliding_window=1024,
        layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)],
    ),
    # Gemma 3 27B (public config): 62 layers, 5 sliding-window layers (1024) per global one.
    "gemma-3-27b": dict(
        model_type="gemma3_text", hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=262208,
        max_position_embeddings=131072, sliding_window=1024,
        layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(62)],
    ),
}

RANDOM_SHAPES: dict[str, dict[str, Any]] = {**_TINY, **_FULL}


def random_config(shape: str) -> Any:
    """A transformers config for ``random:<shape>``."""
    from transformers import AutoConfig

    from kvlab.errors import KVLabError

    if shape not in RANDOM_SHAPES:
        raise KVLabError(f"unknown random shape {shape!r}; allowed: {', '.join(sorted(RANDOM_SHAPES))}")
    fields = dict(RANDOM_SHAPES[shape])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    config.tie_word_embeddings = fields.get("tie_word_embeddings", False)
    return config
