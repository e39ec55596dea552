"""Shared fixtures: tiny random models of every supported architecture, and a reference decoder."""

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


@torch.no_grad()
def reference_greedy(model, ids: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with plain transformers (DynamicCache, SDPA), left padding, explicit positions."""
    from kvlab.generation import left_pad, positions_from_valid

    input_ids, valid = left_pad(ids)
    positions = positions_from_valid(valid)
    mask = valid.long()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits = [out.logits[:, -1]]
    cache, token, pos = out.past_key_values, out.logits[:, -1].argmax(-1), positions[:, -1]
    tokens = [token]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=torch.long)], 1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        logits.append(out.logits[:, -1])
        tokens.append(token)
    return torch.stack(tokens, 1), torch.stack(logits, 1).float()
