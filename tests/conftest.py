"""Shared fixtures: tiny random models of every supported architecture, and random prompts."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KVLAB_QUIET", "1")
# The tests run tiny shapes, where thread start-up dominates; one thread is faster and immune to
# oversubscription when the machine is shared.
torch.set_num_threads(1)
# Without a GPU the Triton kernels run in the interpreter; the flag must be set before triton is
# first imported, by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3"]


@pytest.fixture(scope="session")
def tiny_models():
    import kvlab

    return {arch: kvlab.load(f"random:{arch}") for arch in ARCHS}


def random_prompts(lengths: tuple[int, ...], vocab: int = 250, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
