"""Prefill once, decode many: the driver that runs a model on kvlab's store.

:func:`prefill` runs the prompt through the model once and returns a :class:`Snapshot` (the full
cache, the last queries of every layer, the next-token logits). :func:`decode` starts from a copy of
a snapshot, lets a method compress it, and decodes greedily with explicit positions that continue
from each prompt's original length; it is the only decode loop (experiments call it with forced
tokens and a per-step callback). :func:`generate` is both in one call.

A decode step is planned on the host and run on the device: the host decides from the store's host
copies (room in every layer, the method's :meth:`~kvlab.methods.base.Method.plan_step`), then the
step -- model forward, cache writes, the method's selections and evictions, the next token -- only
launches device work, so on CUDA it is captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import KVStore, LayerStore
from kvlab.errors import KVLabError, check
from kvlab.kernels.dispatch import use_triton
from kvlab.methods.base import Method, PrefillContext, StepContext, make_method
from kvlab.models.integration import KVLabCache, left_pad, new_store, positions_from_valid, running
from kvlab.progress import progress_bar

MAX_OBSERVED_QUERIES = 64  # last prefill queries kept per layer for methods that score with them
EOS_EVERY = 8  # decode reads the end-of-sequence flags back every this many steps


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
    steps: int  # forward passes (forced tokens and generated ones)
    forced_nll: torch.Tensor | None = None  # [B, n_forced] NLL of each forced token (the first: snapshot logits)
    graphs: int = 0  # CUDA graphs captured
    replays: int = 0  # steps replayed from them
    step_keys: int = 0  # distinct step keys (shapes and modes) the decode went through: graphs it would capture


@dataclass
class StepInfo:
    """What an ``on_step`` callback sees: a step's forward has run, the method's ``step_end`` has not."""

    step: int  # 0, 1, ... over forced and generated steps
    store: KVStore
    plans: dict[int, ReadPlan | None]  # what each layer read
    logits: torch.Tensor  # [B, V] float32 next-token logits of the step


class _CudaGraphs:
    """The CUDA side of :class:`_StepGraphs` (a test replaces it to run the same bookkeeping on the CPU)."""

    def warm(self, step: Callable[[], None]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, step: Callable[[], None]) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    def replay(self, graph: Any) -> None:
        graph.replay()


class _StepGraphs:
    """CUDA graphs of decode steps, one per key (the step's kind, the store's layout, the method's plan).

    A key's first step runs eagerly on a side stream (it compiles kernels and sizes buffers: a warm-up
    that is also a real step); its second is captured, then replayed; every later step with that key
    only replays. Capture runs the step's Python once and records its device work without running
    it, so host bookkeeping done by that pass stands; on a replay the driver does it
    (:meth:`~kvlab.cache.store.KVStore.advance_host`).
    """

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend or _CudaGraphs()
        self.graphs: dict[Hashable, Any] = {}
        self.warm: set[Hashable] = set()
        self.replays = 0

    def run(self, key: Hashable, step: Callable[[], None]) -> bool:
        """Run one step; True when it was a replay (its host bookkeeping is the caller's)."""
        graph = self.graphs.get(key)
        if graph is not None:
            self.backend.replay(graph)
            self.replays += 1
            return True
        if key not in self.warm:
            self.warm.add(key)
            self.backend.warm(step)
            return False
        graph = self.graphs[key] = self.backend.capture(step)
        self.backend.replay(graph)
        return False


def _step_graphs(device: torch.device, method: Method, store: KVStore, cuda_graphs: bool,
                 on_step: Callable | None, forced_chunk: int) -> _StepGraphs | None:
    """Graphs for a decode's steps when they can be captured: CUDA, asked for, a graph-safe method on plain
    layers with the Triton kernels, no per-step callback, one token per step."""
    if not (cuda_graphs and device.type == "cuda" and on_step is None and forced_chunk == 1):
        return None
    if not (method.graph_safe() and use_triton(device) and all(type(layer) is LayerStore for layer in store.layers)):
        return None
    return _StepGraphs()


def _forced_tensor(forced: list[list[int]] | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if forced is None:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    t = forced.to(device=device, dtype=torch.long) if isinstance(forced, torch.Tensor) else \
        torch.tensor(forced, dtype=torch.long, device=device).view(batch, -1)
    check(t.dim() == 2 and t.shape[0] == batch, f"forced tokens must be [batch={batch}, n], got {tuple(t.shape)}")
    return t


@torch.inference_mode()
def decode(model: Any, snapshot: Snapshot, method: Method, max_new_tokens: int = 32,
           eos_token_id: int | list[int] | None = None, return_logits: bool = False, *,
           forced: list[list[int]] | torch.Tensor | None = None, forced_chunk: int = 1,
           on_step: Callable[[StepInfo], None] | None = None, compress: bool = True, cuda_graphs: bool = True,
           eos_every: int = EOS_EVERY, copy_store: bool = True, label: str | None = None) -> DecodeResult:
    """Greedy decoding from a copy of ``snapshot`` with ``method`` applied: the only loop that drives
    :class:`~kvlab.models.integration.KVLabCache` in decode.

    ``forced`` (``[B, n]``): tokens fed first, one step each (``forced_chunk`` at a time, for methods
    without decode-time eviction), whose NLL is returned in ``forced_nll``; then ``max_new_tokens``
    tokens are generated (0 is allowed after forced tokens). ``on_step`` is called after every step's
    forward (see :class:`StepInfo`). ``compress=False`` skips the method's ``prefill_end``.
    ``copy_store=False`` decodes in the snapshot's own store (it is consumed: for stores too large to copy).

    Each step is planned on the host -- room in every layer, then :meth:`Method.plan_step` -- and then
    run: the model forward with ``cache_position``, the method's device work, the next token, the
    NLL and the end-of-sequence flags, all on the device. The flags are read back every ``eos_every``
    steps, and that is the only read-back of a step. On CUDA (``cuda_graphs``, a
    :meth:`~Method.graph_safe` method on plain layers, Triton kernels, no ``on_step``) the steps are
    captured in CUDA graphs and replayed (see :class:`_StepGraphs`).
    """
    device = snapshot.logits.device
    batch, vocab = snapshot.logits.shape
    forced_t = _forced_tensor(forced, batch, device)
    n_forced, n_gen = forced_t.shape[1], max_new_tokens
    check(n_gen >= 1 or (n_forced >= 1 and n_gen == 0),
          f"max_new_tokens must be >= 1 (or 0 after forced tokens), got {max_new_tokens}")
    check(forced_chunk >= 1, f"forced_chunk must be >= 1, got {forced_chunk}")
    check(forced_chunk == 1 or type(method).step_end is Method.step_end,
          f"forced_chunk > 1 feeds several tokens per step, which {method.name!r} (it evicts during decode) "
          f"cannot take; use forced_chunk=1")
    check(eos_every >= 1, f"eos_every must be >= 1, got {eos_every}")
    store = snapshot.store.clone() if copy_store else snapshot.store
    bytes_full = store.kv_bytes_allocated()
    if compress:
        check(method.observation_window() <= MAX_OBSERVED_QUERIES,
              f"observation window must be <= {MAX_OBSERVED_QUERIES} queries, got {method.observation_window()}")
        ctx = PrefillContext(context_lengths=snapshot.context_lengths.clone(), queries=snapshot.queries,
                             scaling=snapshot.scaling, num_query_heads=snapshot.num_query_heads, model=model)
        method.prefill_end(store, ctx)
    kept_after_prefill = store.lengths().clone()
    bytes_after_prefill = store.kv_bytes_allocated()
    appended = n_forced + max(0, n_gen - 1)
    for layer in store.layers:
        layer.reserve(method.decode_reserve(appended + 1))
    cache = KVLabCache(store, method=method, observe_decode=method.observes_decode_queries())
    cache.decoding = True
    eos = sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or []))
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)

    # The decode's device state: static buffers every step reads and writes in place.
    tokens = torch.zeros(batch, max(n_gen, 1), dtype=torch.long, device=device)
    all_logits = torch.zeros(batch, max(n_gen, 1), vocab, device=device) if return_logits else None
    nll = torch.zeros(batch, n_forced + 1, device=device)  # column n_forced: a spare for the last forced step
    position = snapshot.context_lengths.to(device=device, dtype=torch.long).clone()[:, None]  # [B, 1]
    forced_i = torch.zeros(1, dtype=torch.long, device=device)
    gen_i = torch.zeros(1, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    done_at = torch.full((batch,), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
    cache.q_positions = position
    host_step = [0]

    def start_generation(logits: torch.Tensor) -> None:
        """The first generated token, from the logits after the prompt (and the forced tokens)."""
        first = logits.argmax(-1)
        tokens[:, 0] = first
        if all_logits is not None:
            all_logits[:, 0] = logits
        done.copy_(torch.isin(first, eos_t))
        done_at.copy_(torch.where(done, 0, torch.iinfo(torch.long).max))

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, position_ids=positions, cache_position=positions[0],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        if on_step is not None:
            on_step(StepInfo(host_step[0], store, dict(cache.plans), logits))
        method.step_end(store, StepContext(step=host_step[0], positions=positions[:, -1], queries=cache.queries))
        return logits

    def forced_step() -> None:
        logits = forward(forced_t.index_select(1, forced_i), position)
        target = forced_t.index_select(1, (forced_i + 1).clamp(max=n_forced - 1))[:, 0]
        nll.index_copy_(1, forced_i + 1, F.cross_entropy(logits, target, reduction="none")[:, None])
        if n_gen:
            start_generation(logits)
        forced_i.add_(1)
        position.add_(1)

    def chunk_step(s: int, e: int) -> None:  # several forced tokens in one forward (eager)
        positions = position + torch.arange(e - s, device=device)[None, :]
        cache.q_positions = positions
        out = model(input_ids=forced_t[:, s:e], position_ids=positions, cache_position=positions[0],
                    past_key_values=cache, use_cache=True)
        logits = out.logits.float()  # [B, L, V]
        m = min(e + 1, n_forced) - (s + 1)  # targets s+1 .. inside this chunk's logits
        if m > 0:
            nll[:, s + 1:s + 1 + m] = F.cross_entropy(logits[:, :m].reshape(-1, vocab),
                                                      forced_t[:, s + 1:s + 1 + m].reshape(-1),
                                                      reduction="none").view(batch, m)
        if on_step is not None:
            on_step(StepInfo(host_step[0], store, dict(cache.plans), logits[:, -1]))
        if n_gen:
            start_generation(logits[:, -1])
        position.add_(e - s)
        cache.q_positions = position

    def gen_step() -> None:
        last = tokens.index_select(1, gen_i)  # [B, 1]
        logits = forward(last, position)
        nxt = torch.where(done, last[:, 0], logits.argmax(-1))
        tokens.index_copy_(1, gen_i + 1, nxt[:, None])
        if all_logits is not None:
            all_logits.index_copy_(1, gen_i + 1, logits[:, None])
        newly = torch.isin(nxt, eos_t) & ~done
        done_at.copy_(torch.where(newly, gen_i + 1, done_at))
        done.logical_or_(newly)
        gen_i.add_(1)
        position.add_(1)

    if n_forced:
        nll[:, 0] = F.cross_entropy(snapshot.logits.float(), forced_t[:, 0], reduction="none")
    elif n_gen:
        start_generation(snapshot.logits.float())
    graphs = _step_graphs(device, method, store, cuda_graphs, on_step, forced_chunk)

    keys: set[Hashable] = set()

    def run(kind: str, step: Callable[[], None]) -> None:
        signature = (kind, store.signature(), method.plan_step(store, host_step[0]))
        keys.add(signature)
        if graphs is None:
            step()
        elif graphs.run(signature, step):
            store.advance_host(1)

    generated = 0
    steps = -(-n_forced // forced_chunk) + max(0, n_gen - 1)
    start = time.perf_counter()
    with running(model, cache), progress_bar(label or f"decode ({method.name})", total=steps) as advance:
        for s in range(0, n_forced, forced_chunk):
            e = min(s + forced_chunk, n_forced)
            store.ensure_room(e - s)
            if e - s == 1:
                run("forced", forced_step)
            else:
                method.plan_step(store, host_step[0])
                chunk_step(s, e)
            host_step[0] += 1
            advance(1)
        for j in range(max(0, n_gen - 1)):
            if eos and j % eos_every == 0 and bool(done.all()):  # the one read-back, every eos_every steps
                break
            store.ensure_room(1)
            run("gen", gen_step)
            generated += 1
            host_step[0] += 1
            advance(1)
        method.decode_end(store)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if eos and n_gen and bool(done.all()):  # stop where every sequence had ended, as a step-by-step check would
        generated = min(generated, int(done_at.max()))
    n_out = generated + 1 if n_gen else 0
    return DecodeResult(
        tokens=tokens[:, :n_out], logits=all_logits[:, :n_out] if all_logits is not None else None,
        kept_after_prefill=kept_after_prefill, kept_at_end=store.lengths().clone(), bytes_full=bytes_full,
        bytes_after_prefill=bytes_after_prefill, bytes_at_end=store.kv_bytes_allocated(),
        decode_seconds=seconds, steps=-(-n_forced // forced_chunk) + generated,
        forced_nll=nll[:, :n_forced] if n_forced else None,
        graphs=len(graphs.graphs) if graphs else 0, replays=graphs.replays if graphs else 0, step_keys=len(keys),
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
             max_new_tokens: int = 32, block_size: int = 16, chat: bool | None = None, cuda_graphs: bool = True,
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
    result = decode(model, snapshot, method, max_new_tokens, eos_token_id=eos, cuda_graphs=cuda_graphs)
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
