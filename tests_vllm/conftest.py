"""Shared fixtures of the vLLM tests (run under .venv-vllm: `make test` does).

A vLLM engine takes 20-40 s to start on 2 cores, so each test module shares its engines
(module-scoped fixtures) and most tests use a tiny random-weight model directory made here.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# Before vLLM is imported anywhere: a small KV pool, kvlab's selection record on, and functions for
# LLM.apply_model (the test's own inspection helpers) sent to the worker.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["KVLAB_VLLM_RECORD"] = "1"
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("KVLAB_QUIET", "1")

TINY_VOCAB = 512


def make_tiny_model(path: Path) -> Path:
    """A 4-layer Qwen2 with random weights (2 KV heads, 4 query heads, head_dim 64), saved as safetensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, initializer_range=0.25)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


def start_llm(model: Path, kvlab: dict | None, **kw):
    from vllm import LLM

    extra = {"kvlab": kvlab} if kvlab is not None else {}
    return LLM(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=4096, enforce_eager=True,
               block_size=128, max_num_seqs=8, seed=0, additional_config=extra, **kw)


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
