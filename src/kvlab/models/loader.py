"""``kvlab.load``: built-in GGUF models, Hugging Face ids or directories, and random-weight shapes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import KVLabError
from kvlab.models.builtin import BUILTIN_MODELS, ensure_converted
from kvlab.models.shapes import RANDOM_SHAPES, random_config

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma3_text", "gemma3")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise KVLabError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class ByteTokenizer:
    """A byte-level tokenizer for random-weight models: one token per UTF-8 byte, modulo the vocabulary."""

    chat_template = None
    bos_token_id = None
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KVLabError(
            f"unsupported architecture {model_type!r}; kvlab runs: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def random_model(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Any, ByteTokenizer]:
    """A model of a known shape with random weights (N(0, 0.02)); built without any download."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = random_config(shape)
    config._attn_implementation = "sdpa"

    # Skip transformers' (slow) initialisation but build on the CPU, so that non-persistent buffers
    # (RoPE frequencies, Gemma's embedding scale) are computed as usual; then fill every parameter.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                # Gemma norms scale by (1 + w); others by w.
                param.fill_(0.0 if config.model_type.startswith("gemma") else 1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.eval()
    return model, ByteTokenizer(config.vocab_size)


def load(name_or_path: str, dtype: str | torch.dtype = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    ``name_or_path`` is a built-in model (``kvlab models`` lists them), ``random:<shape>``, a local
    directory, or a Hugging Face model id available in the local cache.
    """
    torch_dtype = parse_dtype(dtype)
    if name_or_path.startswith("random:"):
        return random_model(name_or_path.split(":", 1)[1], torch_dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    builtin = BUILTIN_MODELS.get(name_or_path)
    if builtin is not None:
        source = str(ensure_converted(builtin))
    elif Path(name_or_path).is_dir():
        source = name_or_path
    elif "/" in name_or_path and not Path(name_or_path).exists():
        source = name_or_path  # a hub id: works offline when it is in the local hub cache
    else:
        raise KVLabError(
            f"unknown model {name_or_path!r}; allowed: {', '.join(BUILTIN_MODELS)}, "
            f"random:<{'|'.join(RANDOM_SHAPES)}>, a local model directory, or a Hugging Face id"
        )
    start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise KVLabError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if builtin is not None and not builtin.chat:
        tokenizer.chat_template = None  # a base model: prompts are plain continuations
    model.eval()
    model.kvlab_load_seconds = time.perf_counter() - start
    model.kvlab_name = name_or_path
    return model, tokenizer
