"""Rebuild a SentencePiece-BPE tokenizer that transformers' GGUF conversion leaves without merges.

transformers 5.2 converts Gemma 3's GGUF vocabulary into a Unigram ``tokenizer.json`` that its
``GemmaTokenizer`` then loads as BPE *without merges*, so text is split into single characters (four
times the tokens, and attention patterns unlike the real model's). SentencePiece BPE merges follow
the vocabulary order, so they can be recovered: every piece that splits into two pieces of the
vocabulary is a merge, ranked by the piece's id (the same recovery transformers uses for .model files).
"""

from __future__ import annotations

import json
from pathlib import Path


def rebuild_bpe(tokenizer_json: Path) -> bool:
    """Rewrite ``tokenizer_json`` in place as BPE with recovered merges; False if it was not Unigram."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "Unigram":
        return False
    vocab = {piece: i for i, (piece, _score) in enumerate(data["model"]["vocab"])}
    merges = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    data["model"] = {
        "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
        "vocab": vocab, "merges": [[left, right] for *_, left, right in merges],
    }
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return True
