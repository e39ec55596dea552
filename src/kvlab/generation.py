"""Prefill once, decode many: the driver that runs a model on kvlab's store.

:func:`prefill` runs the prompt through the model once and returns a :class:`Snapshot` (the full
cache, the last queries of every layer, the next-token logits, and what it captured at earlier points).
A :class:`Decoder` starts from a copy of a snapshot, lets a method compress it, and decodes greedily
with explicit positions that continue from each prompt's original length; :func:`decode` runs one to
the end (experiments call it with forced tokens and a per-step callback). :func:`generate` is both in
one call.

A decode step is planned on the host and run on the device. :meth:`Decoder.plan` decides from the
store's host copies -- room in every layer, then the method's :meth:`~kvlab.methods.base.Method.plan_step`
-- and returns the step's :class:`~kvlab.methods.base.StepPlan`, a value; :meth:`Decoder.step` hands it
to the cache (:class:`kvlab.runtime.KVLabCache`) and runs the step -- model forward, cache writes, the
method's selections as the plan says, its evictions, the next token -- which only launches device work,
so on CUDA it is captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvlab.attention.plans import ReadPlan
from kvlab.cache.store import WINDOW_SLACK, KVStore, LayerStore
from kvlab.errors import KVLabError, check
from kvlab.kernels.dispatch import use_triton
from kvlab.methods.base import Method, PrefillContext, StepContext, StepPlan, make_method
from kvlab.models.shaping import left_pad, new_store, positions_from_valid
from kvlab.progress import progress_bar
from kvlab.runtime import KVLabCache, running

MAX_OBSERVED_QUERIES = 64  # last prefill queries kept per layer for methods that score with them
EOS_EVERY = 8  # on CUDA, decode reads the end-of-sequence flags back every this many steps (on the CPU: every step)


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


# ----------------------------------------------------------------------------- prefill
@dataclass
class Captured:
    """Queries (the last observed) and next-token logits at one capture point of a prefill, and copies of the
    sliding-window layers (they keep only their window, so they cannot be truncated afterwards)."""

    queries: dict[int, torch.Tensor]
    logits: torch.Tensor
    sliding: dict[int, LayerStore] = field(default_factory=dict)


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
    captured: dict[int, Captured] = field(default_factory=dict)  # capture point -> what prefill saw there


def _scaling(model: Any) -> float:
    attn = next(m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx"))
    return float(attn.scaling)


def _check_context(model: Any, lengths: list[int], max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(lengths) + max_new_tokens
    if limit is not None and longest > limit:
        raise KVLabError(f"prompt of {max(lengths)} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {limit} tokens")


def _chunk_ends(length: int, chunk_size: int, capture: list[int]) -> list[int]:
    """Where prefill's chunks end: with capture points, at every point and every ``chunk_size`` tokens;
    without, every ``chunk_size`` tokens counted from the end (the last chunk is a full one)."""
    if capture:
        return sorted(set(capture) | set(range(chunk_size, length, chunk_size)))
    return list(range(length, 0, -chunk_size))[::-1]


@torch.inference_mode()
def prefill(model: Any, token_ids: list[list[int]], *, block_size: int = 16, chunk_size: int = 2048,
            reserve_tokens: int = 0, observe: int = MAX_OBSERVED_QUERIES, capture: Sequence[int] = (),
            label: str = "prefill") -> Snapshot:
    """Run the prompts through ``model`` once and return a :class:`Snapshot`.

    The prompt is fed in chunks of ``chunk_size`` tokens; the last ``observe`` queries of every layer are
    kept. ``reserve_tokens`` preallocates room for decoding. ``capture``: points (token counts, prompts of
    equal length) at which a chunk ends and the queries and logits are saved in ``Snapshot.captured``
    (the prompt's length is always one): :func:`kvlab.experiments.runner.truncate` then gives the snapshot
    as it was at a point, exactly (causality), from this one prefill.
    """
    check(chunk_size >= observe, f"chunk_size ({chunk_size}) must be at least the observation window ({observe})")
    lengths = [len(x) for x in token_ids]
    check(not capture or len(set(lengths)) == 1, "capture points need prompts of equal length")
    _check_context(model, lengths, reserve_tokens)
    param = next(model.parameters())
    input_ids, valid = (t.to(param.device) for t in left_pad(token_ids))
    positions = positions_from_valid(valid)
    batch, length = input_ids.shape
    points = sorted({p for p in capture if 0 < p <= length} | {length}) if capture else [length]
    store = new_store(model.config, batch, block_size, param.dtype, param.device)
    for layer in store.layers:
        layer.reserve(valid.sum(1).repeat_interleave(layer.kv_heads) + reserve_tokens if layer.sliding_window is None
                      else min(length, layer.sliding_window + WINDOW_SLACK) + reserve_tokens)
    cache = KVLabCache(store, observe=observe)
    observed: dict[int, torch.Tensor] = {}  # the last `observe` queries of each layer so far
    captured: dict[int, Captured] = {}
    start_time = time.perf_counter()
    start = 0
    with running(model, cache), progress_bar(f"{label} {length} tokens × {batch}", total=length) as advance:
        for end in _chunk_ends(length, chunk_size, points if capture else []):
            cache.set_inputs(positions[:, start:end], valid[:, start:end])
            out = model(input_ids=input_ids[:, start:end], position_ids=positions[:, start:end],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            for i, q in cache.queries.items():
                observed[i] = q if i not in observed else torch.cat([observed[i], q], 2)[:, :, -observe:]
            if end in points:
                sliding = {i: layer.clone() for i, layer in enumerate(store.layers)
                           if layer.sliding_window is not None and end < length}
                captured[end] = Captured(dict(observed), out.logits[:, -1].float(), sliding)
            advance(end - start)
            start = end
    final = captured[length]
    return Snapshot(
        store=store, queries=final.queries, logits=final.logits, context_lengths=valid.sum(1),
        scaling=_scaling(model), num_query_heads=model.config.num_attention_heads,
        prefill_seconds=time.perf_counter() - start_time, prompt_ids=token_ids,
        captured=captured if capture else {},
    )


# ----------------------------------------------------------------------------- decode
@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, n] generated ids
    logits: torch.Tensor | None  # [B, n, V] when asked for
    kept_after_prefill: torch.Tensor  # [layers, B, kv_heads] tokens held after the method's prefill_end
    kept_at_end: torch.Tensor
    bytes_full: int  # KV bytes of the uncompressed snapshot
    bytes_after_prefill: int  # allocated KV bytes after compression
    bytes_at_end: int
    decode_seconds: float  # the steps run (steps_run of them)
    steps: int  # forward passes needed (forced tokens and generated ones, up to where every sequence ended)
    forced_nll: torch.Tensor | None = None  # [B, n_forced] NLL of each forced token (the first: snapshot logits)
    graphs: int = 0  # CUDA graphs captured
    replays: int = 0  # steps replayed from them
    step_keys: int = 0  # distinct step keys (shapes and modes) the decode went through: graphs it would capture
    steps_run: int = 0  # forward passes run: ``steps``, or more where the end was read back only every few steps
    compress_seconds: float = 0.0  # the method's prefill_end

    @property
    def seconds_per_step(self) -> float:
        """Decode time per forward pass run (a step past the end costs what a needed one does)."""
        return self.decode_seconds / max(self.steps_run, 1)

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens per second and sequence, at the rate the steps ran."""
        return 1.0 / self.seconds_per_step if self.decode_seconds > 0 else None


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
    """CUDA graphs of decode steps, one per key (the step's kind, the store's layout, the step plan's signature).

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


def _step_graphs(device: torch.device, method: Method, store: KVStore, triton: bool, cuda_graphs: bool,
                 on_step: Callable | None, forced_chunk: int) -> _StepGraphs | None:
    """Graphs for a decode's steps when they can be captured: CUDA, asked for, a graph-safe method on plain
    layers with the Triton kernels, no per-step callback, one token per step."""
    if not (cuda_graphs and device.type == "cuda" and on_step is None and forced_chunk == 1):
        return None
    if not (method.graph_safe() and triton and all(type(layer) is LayerStore for layer in store.layers)):
        return None
    return _StepGraphs()


def _forced_tensor(forced: list[list[int]] | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if forced is None:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    t = forced.to(device=device, dtype=torch.long) if isinstance(forced, torch.Tensor) else \
        torch.tensor(forced, dtype=torch.long, device=device).view(batch, -1)
    check(t.dim() == 2 and t.shape[0] == batch, f"forced tokens must be [batch={batch}, n], got {tuple(t.shape)}")
    return t


class Decoder:
    """One greedy decode from a copy of a snapshot with a method applied, in three parts:
    :meth:`plan` (host), :meth:`step` (device) and :meth:`finish`.

    ``forced`` (``[B, n]``): tokens fed first (``forced_chunk`` at a time, for methods without decode-time
    eviction), whose NLL is returned in ``forced_nll``; then ``max_new_tokens`` tokens are generated (0 is
    allowed after forced tokens). ``on_step`` is called after every step's forward (see :class:`StepInfo`).
    ``compress=False`` skips the method's ``prefill_end``. ``copy_store=False`` decodes in the snapshot's own
    store (it is consumed: for stores too large to copy). ``eos_every``: generated steps between reads of the
    end-of-sequence flags, the decode's only read-back (default: every step on the CPU, where a read costs no
    device sync; :data:`EOS_EVERY` on CUDA). On CUDA (``cuda_graphs``, a :meth:`~Method.graph_safe` method on
    plain layers, Triton kernels, no ``on_step``) the steps are captured in CUDA graphs and replayed.

    Every step runs inside :func:`kvlab.runtime.running`, so decoders may be stepped in turn in one process.
    """

    @torch.inference_mode()
    def __init__(self, model: Any, snapshot: Snapshot, method: Method, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, return_logits: bool = False, *,
                 forced: list[list[int]] | torch.Tensor | None = None, forced_chunk: int = 1,
                 on_step: Callable[[StepInfo], None] | None = None, compress: bool = True, cuda_graphs: bool = True,
                 eos_every: int | None = None, copy_store: bool = True) -> None:
        device = snapshot.logits.device
        batch, vocab = snapshot.logits.shape
        self.forced = _forced_tensor(forced, batch, device)
        self.n_forced, self.n_gen = self.forced.shape[1], max_new_tokens
        check(self.n_gen >= 1 or (self.n_forced >= 1 and self.n_gen == 0),
              f"max_new_tokens must be >= 1 (or 0 after forced tokens), got {max_new_tokens}")
        check(forced_chunk >= 1, f"forced_chunk must be >= 1, got {forced_chunk}")
        check(forced_chunk == 1 or not method.evicts_during_decode(),
              f"forced_chunk > 1 feeds several tokens per step, which {method.name!r} (it evicts during decode) "
              f"cannot take; use forced_chunk=1")
        self.eos_every = eos_every if eos_every is not None else EOS_EVERY if device.type == "cuda" else 1
        check(self.eos_every >= 1, f"eos_every must be >= 1, got {eos_every}")
        self.model, self.method, self.on_step, self.forced_chunk = model, method, on_step, forced_chunk
        self.store = store = snapshot.store.clone() if copy_store else snapshot.store
        self.bytes_full = store.kv_bytes_allocated()
        start = time.perf_counter()
        if compress:
            check(method.observation_window() <= MAX_OBSERVED_QUERIES,
                  f"observation window must be <= {MAX_OBSERVED_QUERIES} queries, got {method.observation_window()}")
            method.prefill_end(store, PrefillContext(
                context_lengths=snapshot.context_lengths.clone(), queries=snapshot.queries, scaling=snapshot.scaling,
                num_query_heads=snapshot.num_query_heads, model=model))
        self.compress_seconds = time.perf_counter() - start
        self.kept_after_prefill = store.lengths().clone()
        self.bytes_after_prefill = store.kv_bytes_allocated()
        for layer in store.layers:
            layer.reserve(method.decode_reserve(self.n_forced + max(0, self.n_gen - 1) + 1))
        self.triton = use_triton(device)  # resolved once: every step's plan carries it
        self.cache = KVLabCache(store, method=method, observe_decode=method.observes_decode_queries())
        self.eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])),
                                dtype=torch.long, device=device)
        self.graphs = _step_graphs(device, method, store, self.triton, cuda_graphs, on_step, forced_chunk)

        # The decode's device state: static buffers every step reads and writes in place.
        self.tokens = torch.zeros(batch, max(self.n_gen, 1), dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, max(self.n_gen, 1), vocab, device=device) if return_logits else None
        self.nll = torch.zeros(batch, self.n_forced + 1, device=device)  # column n_forced: the last forced step's spare
        self.position = snapshot.context_lengths.to(device=device, dtype=torch.long).clone()[:, None]  # [B, 1]
        self.forced_i = torch.zeros(1, dtype=torch.long, device=device)
        self.gen_i = torch.zeros(1, dtype=torch.long, device=device)
        self.ended = torch.zeros(batch, dtype=torch.bool, device=device)
        self.ended_at = torch.full((batch,), torch.iinfo(torch.long).max, dtype=torch.long, device=device)

        # The decode's host state.
        self.fed = 0  # forced tokens fed
        self.generated = 0  # generating steps run (after the first generated token, which the logits give)
        self.steps_run = 0
        self.keys: set[Hashable] = set()
        self.seconds = 0.0  # in plan, step and finish
        if self.n_forced:
            self.nll[:, 0] = F.cross_entropy(snapshot.logits.float(), self.forced[:, 0], reduction="none")
        elif self.n_gen:
            self._start_generation(snapshot.logits.float())

    # ------------------------------------------------------------ the loop's three parts
    def done(self) -> bool:
        """Whether no step is left: every forced token fed and every token generated, or (read back every
        ``eos_every`` generated steps) every sequence ended."""
        if self.fed < self.n_forced:
            return False
        if self.generated >= max(0, self.n_gen - 1):
            return True
        return self.eos.numel() > 0 and self.generated % self.eos_every == 0 and bool(self.ended.all())

    @torch.inference_mode()
    def plan(self) -> StepPlan:
        """The next step's plan, on the host: room in every layer for its tokens, then the method's plan."""
        start = time.perf_counter()
        new_tokens = min(self.forced_chunk, self.n_forced - self.fed) if self.fed < self.n_forced else 1
        self.store.ensure_room(new_tokens)
        plan = self.method.plan_step(self.store, StepPlan(self.steps_run, new_tokens, self.triton))
        self.seconds += time.perf_counter() - start
        return plan

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> None:
        """Run the step ``plan`` describes: a forced token or chunk, else a generated token (device work)."""
        if self.fed < self.n_forced:
            kind, run = ("forced", self._forced_step) if plan.new_tokens == 1 else ("chunk", self._chunk_step)
        else:
            kind, run = "gen", self._gen_step
        key = (kind, self.store.signature(), plan.signature)
        self.keys.add(key)
        self.cache.plan = plan
        start = time.perf_counter()
        with running(self.model, self.cache):
            if self.graphs is None:
                run()
            elif self.graphs.run(key, run):
                self.store.advance_host(plan.new_tokens)
        self.seconds += time.perf_counter() - start
        self.cache.plan = None
        self.steps_run += 1
        if kind == "gen":
            self.generated += 1
        else:
            self.fed += plan.new_tokens

    @torch.inference_mode()
    def finish(self) -> DecodeResult:
        """After the last step: the method's ``decode_end``, and what the decode produced."""
        start = time.perf_counter()
        self.method.decode_end(self.store)
        if self.tokens.device.type == "cuda":
            torch.cuda.synchronize(self.tokens.device)
        seconds = self.seconds + time.perf_counter() - start
        generated = self.generated
        if self.eos.numel() and self.n_gen and bool(self.ended.all()):  # stop where every sequence had ended
            generated = min(generated, int(self.ended_at.max()))
        n_out = generated + 1 if self.n_gen else 0
        return DecodeResult(
            tokens=self.tokens[:, :n_out], logits=self.logits[:, :n_out] if self.logits is not None else None,
            kept_after_prefill=self.kept_after_prefill, kept_at_end=self.store.lengths().clone(),
            bytes_full=self.bytes_full, bytes_after_prefill=self.bytes_after_prefill,
            bytes_at_end=self.store.kv_bytes_allocated(), decode_seconds=seconds, steps=self.forced_steps + generated,
            forced_nll=self.nll[:, :self.n_forced] if self.n_forced else None,
            graphs=len(self.graphs.graphs) if self.graphs else 0, replays=self.graphs.replays if self.graphs else 0,
            step_keys=len(self.keys), steps_run=self.steps_run, compress_seconds=self.compress_seconds,
        )

    @property
    def forced_steps(self) -> int:
        """Steps that feed the forced tokens (``forced_chunk`` at a time)."""
        return -(-self.n_forced // self.forced_chunk)

    @property
    def total_steps(self) -> int:
        """Steps the decode runs at most (fewer where every sequence ends first)."""
        return self.forced_steps + max(0, self.n_gen - 1)

    # ------------------------------------------------------------ the steps (device work)
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model over the step's tokens; the method's ``step_end``; ``[B, L, V]`` float logits."""
        self.cache.q_positions = positions
        out = self.model(input_ids=input_ids, position_ids=positions, cache_position=positions[0],
                         past_key_values=self.cache, use_cache=True)
        logits = out.logits.float()
        if self.on_step is not None:
            self.on_step(StepInfo(self.steps_run, self.store, dict(self.cache.reads), logits[:, -1]))
        self.method.step_end(self.store, StepContext(step=self.steps_run, positions=positions[:, -1],
                                                     queries=self.cache.queries))
        return logits

    def _start_generation(self, logits: torch.Tensor) -> None:
        """The first generated token, from the logits after the prompt (and the forced tokens)."""
        first = logits.argmax(-1)
        self.tokens[:, 0] = first
        if self.logits is not None:
            self.logits[:, 0] = logits
        self.ended.copy_(torch.isin(first, self.eos))
        self.ended_at.copy_(torch.where(self.ended, 0, torch.iinfo(torch.long).max))

    def _forced_step(self) -> None:
        logits = self._forward(self.forced.index_select(1, self.forced_i), self.position)[:, -1]
        target = self.forced.index_select(1, (self.forced_i + 1).clamp(max=self.n_forced - 1))[:, 0]
        self.nll.index_copy_(1, self.forced_i + 1, F.cross_entropy(logits, target, reduction="none")[:, None])
        if self.n_gen:
            self._start_generation(logits)
        self.forced_i.add_(1)
        self.position.add_(1)

    def _chunk_step(self) -> None:
        """Several forced tokens in one forward (eager only: its width is the host's ``fed``)."""
        s, e = self.fed, min(self.fed + self.forced_chunk, self.n_forced)
        positions = self.position + torch.arange(e - s, device=self.position.device)[None, :]
        logits = self._forward(self.forced[:, s:e], positions)  # [B, L, V]
        m = min(e + 1, self.n_forced) - (s + 1)  # targets s+1 .. inside this chunk's logits
        if m > 0:
            batch, _, vocab = logits.shape
            self.nll[:, s + 1:s + 1 + m] = F.cross_entropy(logits[:, :m].reshape(-1, vocab),
                                                           self.forced[:, s + 1:s + 1 + m].reshape(-1),
                                                           reduction="none").view(batch, m)
        if self.n_gen:
            self._start_generation(logits[:, -1])
        self.forced_i.add_(e - s)
        self.position.add_(e - s)

    def _gen_step(self) -> None:
        last = self.tokens.index_select(1, self.gen_i)  # [B, 1]
        logits = self._forward(last, self.position)[:, -1]
        nxt = torch.where(self.ended, last[:, 0], logits.argmax(-1))
        self.tokens.index_copy_(1, self.gen_i + 1, nxt[:, None])
        if self.logits is not None:
            self.logits.index_copy_(1, self.gen_i + 1, logits[:, None])
        newly = torch.isin(nxt, self.eos) & ~self.ended
        self.ended_at.copy_(torch.where(newly, self.gen_i + 1, self.ended_at))
        self.ended.logical_or_(newly)
        self.gen_i.add_(1)
        self.position.add_(1)


def decode(model: Any, snapshot: Snapshot, method: Method, max_new_tokens: int = 32,
           eos_token_id: int | list[int] | None = None, return_logits: bool = False, *,
           forced: list[list[int]] | torch.Tensor | None = None, forced_chunk: int = 1,
           on_step: Callable[[StepInfo], None] | None = None, compress: bool = True, cuda_graphs: bool = True,
           eos_every: int | None = None, copy_store: bool = True, label: str | None = None) -> DecodeResult:
    """Greedy decoding from a copy of ``snapshot`` with ``method`` applied: a :class:`Decoder` (see it for
    the arguments) run to the end, with a progress bar labelled ``label``."""
    decoder = Decoder(model, snapshot, method, max_new_tokens, eos_token_id, return_logits, forced=forced,
                      forced_chunk=forced_chunk, on_step=on_step, compress=compress, cuda_graphs=cuda_graphs,
                      eos_every=eos_every, copy_store=copy_store)
    with progress_bar(label or f"decode ({method.name})", total=decoder.total_steps) as advance:
        while not decoder.done():
            decoder.step(decoder.plan())
            advance(1)
    return decoder.finish()


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
        "decode_ms_per_step": 1000 * result.seconds_per_step,
        "decode_tokens_per_second": len(prompts) * result.tokens_per_second if result.tokens_per_second else None,
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
