"""Prefill once, decode many: the driver that runs a model on kvlab's store.

:func:`prefill` runs the prompt through the model once and returns a :class:`Snapshot` (the full
cache, the last queries of every layer, the next-token logits). :func:`decode` starts from a copy of
a snapshot, lets a method compress it, and decodes greedily with explicit positions that continue
from each prompt's original length. :func:`generate` is both in one call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlab.cache.store import KVStore
from kvlab.errors import KVLabError, check
from kvlab.methods.base import Method, PrefillContext, StepContext, make_method
from kvlab.models.integration import KVLabCache, new_store, running
from kvlab.progress import progress_bar

MAX_OBSERVED_QUERIES = 64  # last prefill queries kept per layer for methods that score with them


def encode_prompts(tokenizer: Any, prompts: list[str], chat: bool | None = None) -> list[list[int]]:
    """Token ids per prompt; instruct models with a chat template get it applied (``chat=None``: auto)."""
    check(len(prompts) > 0, "no prompt given")
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    ids = []
    for text in prompts:
        check(isinstance(text, str) and text != "", "every prompt must be a non-empty string")
        if use_chat:
            tokens = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
            if isinstance(tokens, dict) or hasattr(tokens, "input_ids"):
                tokens = tokens["input_ids"]
        else:
            tokens = tokenizer.encode(text)
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is not None and (not tokens or tokens[0] != bos):
                tokens = [bos] + tokens
        ids.append(list(tokens))
    return ids


def left_pad(ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, L]`` left-padded and ``valid [B, L]``."""
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(ids), length, dtype=torch.bool)
    for i, x in enumerate(ids):
        input_ids[i, length - len(x):] = torch.tensor(x, dtype=torch.long)
        valid[i, length - len(x):] = True
    return input_ids, valid


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over the valid tokens of each row (padding gets 0)."""
    return (torch.cumsum(valid.long(), 1) - 1).clamp(min=0)


@dataclass
class Snapshot:
    """A prefilled context that any number of methods can decode from."""

    store: KVStore
    queries: dict[int, torch.Tensor]
    logits: torch.Tensor  # [B, V] next-token logits after the prompt
    context_lengths: torch.Tensor  # [B]
    scaling: float
    num_query_heads: int
    prefill_seconds: float
    prompt_ids: list[list[int]] = field(default_factory=list)


def _scaling(model: Any) -> float:
    attn = next(m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx"))
    return float(attn.scaling)


def _check_context(model: Any, lengths: list[int], max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(lengths) + max_new_tokens
    if limit is not None and longest > limit:
        raise KVLabError(f"prompt of {max(lengths)} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {limit} tokens")


@torch.inference_mode()
def prefill(model: Any, token_ids: list[list[int]], *, block_size: int = 16, chunk_size: int = 2048,
            reserve_tokens: int = 0, observe: int = MAX_OBSERVED_QUERIES) -> Snapshot:
    """Run the prompts through ``model`` once and return a :class:`Snapshot`.

    The prompt is fed in chunks of ``chunk_size`` tokens (the last chunk is full-length, so the last
    ``observe`` queries come from one forward). ``reserve_tokens`` preallocates room for decoding.
    """
    check(chunk_size >= observe, f"chunk_size ({chunk_size}) must be at least the observation window ({observe})")
    _check_context(model, [len(x) for x in token_ids], reserve_tokens)
    param = next(model.parameters())
    input_ids, valid = (t.to(param.device) for t in left_pad(token_ids))
    positions = positions_from_valid(valid)
    batch, length = input_ids.shape
    store = new_store(model.config, batch, block_size, param.dtype, param.device)
    for layer in store.layers:
        layer.reserve(valid.sum(1).repeat_interleave(layer.kv_heads) + reserve_tokens
                      if layer.sliding_window is None else min(length, layer.sliding_window + 64) + reserve_tokens)
    cache = KVLabCache(store, observe=observe)
    # Chunk boundaries from the end, so the last chunk is a full one.
    bounds = list(range(length, 0, -chunk_size))[::-1]
    starts = [0] + bounds[:-1]
    start_time = time.perf_counter()
    logits = None
    with running(model, cache), progress_bar(f"prefill {length} tokens × {batch}", total=length) as advance:
        for s, e in zip(starts, bounds, strict=True):
            cache.set_inputs(positions[:, s:e], valid[:, s:e])
            out = model(input_ids=input_ids[:, s:e], position_ids=positions[:, s:e], past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            advance(e - s)
    return Snapshot(
        store=store, queries=cache.queries, logits=logits, context_lengths=valid.sum(1),
        scaling=_scaling(model), num_query_heads=model.config.num_attention_heads,
        prefill_seconds=time.perf_counter() - start_time, prompt_ids=token_ids,
    )


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, n] generated ids
    logits: torch.Tensor | None  # [B, n, V] when asked for
    kept_after_prefill: torch.Tensor  # [layers, B, kv_heads] tokens held after the method's prefill_end
    kept_at_end: torch.Tensor
    bytes_full: int  # KV bytes of the uncompressed snapshot
    bytes_after_prefill: int  # allocated KV bytes after compression
    bytes_at_end: int
    decode_seconds: float
    steps: int


@torch.inference_mode()
def decode(model: Any, snapshot: Snapshot, method: Method, max_new_tokens: int = 32,
           eos_token_id: int | list[int] | None = None, return_logits: bool = False) -> DecodeResult:
    """Greedy decoding from a copy of ``snapshot`` with ``method`` applied."""
    check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    store = snapshot.store.clone()
    bytes_full = store.kv_bytes_allocated()
    ctx = PrefillContext(context_lengths=snapshot.context_lengths.clone(), queries=snapshot.queries,
                         scaling=snapshot.scaling, num_query_heads=snapshot.num_query_heads, model=model)
    check(method.observation_window() <= MAX_OBSERVED_QUERIES,
          f"observation window must be <= {MAX_OBSERVED_QUERIES} queries, got {method.observation_window()}")
    method.prefill_end(store, ctx)
    kept_after_prefill = store.lengths().clone()
    bytes_after_prefill = store.kv_bytes_allocated()
    for layer in store.layers:
        layer.reserve(max_new_tokens)
    cache = KVLabCache(store, method=method, observe_decode=method.observes_decode_queries())
    cache.decoding = True
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    batch = snapshot.logits.shape[0]
    next_token = snapshot.logits.argmax(-1)
    tokens, all_logits = [next_token], [snapshot.logits] if return_logits else []
    device = snapshot.logits.device
    done = torch.tensor([int(t) in eos for t in next_token], device=device)
    valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
    start = time.perf_counter()
    steps = 0
    with running(model, cache), progress_bar(f"decode ({method.name})", total=max_new_tokens - 1) as advance:
        for step in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            pos = (snapshot.context_lengths + step)[:, None]
            cache.set_inputs(pos, valid)
            out = model(input_ids=next_token[:, None], position_ids=pos, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            method.step_end(store, StepContext(step=step, positions=pos[:, 0], queries=cache.queries))
            next_token = torch.where(done, next_token, logits.argmax(-1))
            done |= torch.tensor([int(t) in eos for t in next_token], device=device)
            tokens.append(next_token)
            if return_logits:
                all_logits.append(logits)
            steps += 1
            advance(1)
    seconds = time.perf_counter() - start
    return DecodeResult(
        tokens=torch.stack(tokens, 1), logits=torch.stack(all_logits, 1) if return_logits else None,
        kept_after_prefill=kept_after_prefill, kept_at_end=store.lengths().clone(), bytes_full=bytes_full,
        bytes_after_prefill=bytes_after_prefill, bytes_at_end=store.kv_bytes_allocated(),
        decode_seconds=seconds, steps=steps,
    )


@dataclass
class GenerationResult:
    texts: list[str]
    stats: dict[str, Any]
    result: DecodeResult


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """The token ids that end a generation (the model's generation config, else the tokenizer's)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def generate(model: Any, tokenizer: Any, prompts: list[str] | str, method: str | Method = "full",
             max_new_tokens: int = 32, block_size: int = 16, chat: bool | None = None,
             **method_params: Any) -> GenerationResult:
    """Generate greedily for each prompt with ``method``; returns texts and stats.

    Stats: tokens kept per layer and KV head, cache bytes before and after compression, prefill and
    decode time, decode tokens/s.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(method, str):
        method = make_method(method, **method_params)
    else:
        check(not method_params, "pass method parameters either to the Method object or as keywords, not both")
    ids = encode_prompts(tokenizer, prompts, chat)
    snapshot = prefill(model, ids, block_size=block_size, reserve_tokens=max_new_tokens,
                       observe=max(method.observation_window(), 1))
    eos = eos_ids(tokenizer, model)
    result = decode(model, snapshot, method, max_new_tokens, eos_token_id=eos)
    texts = decode_texts(tokenizer, result.tokens, eos)
    new_tokens = result.steps * len(prompts)
    stats = {
        **method.describe(),
        "prompt_tokens": snapshot.context_lengths.tolist(),
        "kept_tokens_per_layer_head": result.kept_after_prefill.tolist(),
        "kept_fraction": float(result.kept_after_prefill.sum() / snapshot.store.lengths().sum()),
        "cache_mb_full": snapshot.store.kv_bytes_allocated() / 2**20,
        "cache_mb_after_prefill": result.bytes_after_prefill / 2**20,
        "cache_mb_at_end": result.bytes_at_end / 2**20,
        "prefill_seconds": snapshot.prefill_seconds,
        "decode_seconds": result.decode_seconds,
        "decode_tokens_per_second": new_tokens / result.decode_seconds if result.decode_seconds > 0 else None,
        "new_tokens": result.tokens.shape[1],
    }
    return GenerationResult(texts=texts, stats=stats, result=result)


def decode_texts(tokenizer: Any, tokens: torch.Tensor, eos: list[int]) -> list[str]:
    """Text of each row of generated ``tokens`` ``[B, n]``, cut at the first end-of-sequence token."""
    texts = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
