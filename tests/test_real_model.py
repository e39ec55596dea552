"""The default real model (GGUF from PyPI): kvlab's ``full`` greedy output equals transformers'."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.generation import encode_prompts


@pytest.mark.slow
def test_qwen_full_greedy_matches_transformers():
    model, tok = kvlab.load("qwen2.5-coder-0.5b")
    prompt = "Write a Python function that returns the sum of a list."
    ids = encode_prompts(tok, [prompt])
    result = kvlab.generate(model, tok, prompt, method="full", max_new_tokens=16)
    inp = torch.tensor(ids)
    with torch.no_grad():
        ref = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=16, do_sample=False)
    assert result.result.tokens[0].tolist() == ref[0, inp.shape[1]:].tolist()
    assert "python function" in result.texts[0].lower()


@pytest.mark.slow
def test_gemma_tokenizer_has_merges_and_a_sink():
    model, tok = kvlab.load("gemma3-270m")
    assert tok.tokenize("The capital of France is") == ["The", "▁capital", "▁of", "▁France", "▁is"]
    assert encode_prompts(tok, ["The capital"])[0][0] == tok.bos_token_id
    result = kvlab.generate(model, tok, "The capital of France is", max_new_tokens=8)
    assert "paris" in result.texts[0].lower() or "france" in result.texts[0].lower()
