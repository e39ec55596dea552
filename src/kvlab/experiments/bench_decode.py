"""``kvlab bench decode``: what one decode step costs, on the real model and on the host.

Two tables, each from one run on one machine:

1. **Real model** (:func:`run`): the same prompt decoded greedily with transformers' own
   ``DynamicCache`` + SDPA and with kvlab ``full`` (the paged store, the ``"kvlab"`` attention
   function), alternating in rounds so that noise on a shared machine hits both; the figure that
   matters is the ratio of per-step times. ``block-route`` and ``streaming`` decode the same
   snapshot beside them.
2. **Host time** (:func:`host_time`): a random-weight Llama with tiny layers (hidden 64), so that the
   arithmetic of a step is negligible and its time is what the host spends issuing it -- the time
   that bounds decode on a GPU without CUDA graphs. Per method: ms per step, and the calls that would
   force a device sync on a GPU per step (:class:`SyncCounter`), at two layer counts, so a cost that
   grows with the number of layers shows.

:func:`host_time` uses only ``prefill``, ``decode`` and ``make_method``, so it also runs against an
older checkout of kvlab (``benchmarks/decode_host_time.py --tree DIR``): that is how the "before"
figures in docs/benchmarks.md were taken.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from kvlab.errors import check
from kvlab.generation import decode, left_pad, positions_from_valid, prefill
from kvlab.methods import make_method
from kvlab.progress import track

# Tensor methods that read a device value back into Python (on a GPU: wait for the device).
SYNC_METHODS = frozenset({"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero",
                          "unique", "unique_consecutive", "masked_select", "bincount", "equal", "allclose",
                          "cpu", "numpy", "is_nonzero"})
HOST_METHODS = {"full": {}, "block-route": {"budget": 0.25, "dense_layers": 0}, "streaming": {"budget": 0.25},
                "kv-compress": {"budget": 0.25}, "h2o": {"budget": 0.25}, "tova": {"budget": 0.25}}


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class SyncCounter(TorchFunctionMode):
    """Counts the calls that force a device-to-host sync on a GPU, whatever device the tensors are on.

    The calls: ``bool``/``int``/``float``/``index`` of a tensor, ``item``, ``tolist``, ``nonzero``,
    ``unique``, ``masked_select``, ``bincount``, ``equal``/``allclose``, ``cpu``/``numpy``, indexing or
    assigning with a boolean mask, and ``repeat_interleave`` with tensor repeats (its output size is
    data-dependent). ``counts`` maps each call's name to how often it happened.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sync = name in SYNC_METHODS
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            sync = _bool_index(args[1])
            name = f"{name}[bool mask]"
        elif name == "repeat_interleave":
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            sync = isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if sync:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)


# ------------------------------------------------------------------ 1. the real model
@torch.inference_mode()
def _hf_steps(model: Any, ids: list[list[int]], steps: int) -> float:
    """Seconds per decode step with DynamicCache + SDPA (prefill excluded)."""
    input_ids, valid = left_pad(ids)
    positions = positions_from_valid(valid)
    mask = valid.long()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, token, pos = out.past_key_values, out.logits[:, -1].argmax(-1), positions[:, -1]
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=torch.long)], 1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    return (time.perf_counter() - start) / steps


def _kvlab_step_seconds(model: Any, snapshot: Any, name: str, params: dict[str, Any], steps: int,
                        **decode_kwargs: Any) -> float:
    result = decode(model, snapshot, make_method(name, **params), max_new_tokens=steps + 1, **decode_kwargs)
    # per step run; an older checkout's result (decode_host_time.py --tree) has no steps_run, and without an
    # end-of-sequence id it ran the steps it counted
    return result.decode_seconds / max(getattr(result, "steps_run", result.steps), 1)


def run(model: Any, contexts: list[int], batch: int = 1, steps: int = 16, rounds: int = 2,
        vocab_limit: int | None = None, seed: int = 0, budget: float = 0.25,
        cuda_graphs: bool = True) -> list[dict[str, Any]]:
    """Per context length: ms per decode step for transformers, kvlab ``full``, ``block-route`` and
    ``streaming`` (at ``budget``), and kvlab full's ratio to transformers."""
    check(steps >= 2 and rounds >= 1, "steps must be >= 2 and rounds >= 1")
    vocab = vocab_limit or model.config.vocab_size
    routed = {"budget": budget, "dense_layers": 0}
    rows = []
    for context in track(contexts, "decode benchmark"):
        g = torch.Generator().manual_seed(seed + context)
        ids = [torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(batch)]
        snapshot = prefill(model, ids, reserve_tokens=steps + 1)
        times: dict[str, list[float]] = {"hf": [], "full": [], "block-route": [], "streaming": []}
        for _ in range(rounds):
            times["hf"].append(_hf_steps(model, ids, steps))
            times["full"].append(_kvlab_step_seconds(model, snapshot, "full", {}, steps, cuda_graphs=cuda_graphs))
            times["block-route"].append(_kvlab_step_seconds(model, snapshot, "block-route", routed, steps,
                                                            cuda_graphs=cuda_graphs))
            times["streaming"].append(_kvlab_step_seconds(model, snapshot, "streaming", {"budget": budget}, steps,
                                                          cuda_graphs=cuda_graphs))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"context": context, "batch": batch, "transformers ms/step": 1e3 * med["hf"],
                     "kvlab full ms/step": 1e3 * med["full"], "kvlab / transformers": med["full"] / med["hf"],
                     f"block-route {budget:g} ms/step": 1e3 * med["block-route"],
                     f"streaming {budget:g} ms/step": 1e3 * med["streaming"]})
    return rows


# ------------------------------------------------------------------ 2. host time
def host_model(layers: int) -> Any:
    """A random-weight Llama of ``layers`` layers with tiny ones (hidden 64, 4 query / 2 KV heads of 16)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _syncs_per_step(model: Any, snapshot: Any, name: str, params: dict[str, Any], steps: int) -> float:
    """Sync-forcing calls per decode step, from the first step's end to the last one's (a step callback);
    a kvlab whose decode takes no callback (an older checkout): a decode of ``steps + 1`` tokens minus
    one of 1 token, which runs the method's prefill work and no step."""
    if "on_step" in inspect.signature(decode).parameters:
        marks = []
        with SyncCounter() as counter:
            decode(model, snapshot, make_method(name, **params), max_new_tokens=steps + 1,
                   on_step=lambda info: marks.append(counter.total))
        return (marks[-1] - marks[0]) / (len(marks) - 1)
    counts = []
    for n in (1, steps + 1):
        with SyncCounter() as counter:
            decode(model, snapshot, make_method(name, **params), max_new_tokens=n)
        counts.append(counter.total)
    return (counts[1] - counts[0]) / steps


def host_time(layer_counts: tuple[int, ...] = (2, 16), context: int = 1024, batch: int = 1, steps: int = 32,
              rounds: int = 3, methods: dict[str, dict[str, Any]] | None = None,
              threads: int = 1) -> list[dict[str, Any]]:
    """Per layer count and method: median ms per decode step of the tiny-layer model, ms per step per
    layer, and sync-forcing calls per step (see the module docstring); transformers' DynamicCache
    on the same model is the first row of each layer count. Runs with ``threads`` torch threads (one:
    a step of tiny ops is host work, and a second thread on a shared machine only adds waiting)."""
    methods = methods or HOST_METHODS
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _host_time(layer_counts, context, batch, steps, rounds, methods)
    finally:
        torch.set_num_threads(saved)


def _host_time(layer_counts: tuple[int, ...], context: int, batch: int, steps: int, rounds: int,
               methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for layers in layer_counts:
        model = host_model(layers)
        g = torch.Generator().manual_seed(layers)
        ids = [torch.randint(1, 256, (context,), generator=g).tolist() for _ in range(batch)]
        snapshot = prefill(model, ids, reserve_tokens=steps + 2)
        hf = statistics.median(_hf_steps(model, ids, steps) for _ in range(rounds))
        rows.append({"layers": layers, "method": "transformers DynamicCache", "ms/step": 1e3 * hf,
                     "ms/step/layer": 1e3 * hf / layers, "syncs/step": None})
        for name, params in methods.items():
            seconds = statistics.median(_kvlab_step_seconds(model, snapshot, name, params, steps)
                                        for _ in range(rounds))
            rows.append({"layers": layers, "method": name, "ms/step": 1e3 * seconds,
                         "ms/step/layer": 1e3 * seconds / layers,
                         "syncs/step": _syncs_per_step(model, snapshot, name, params, steps)})
    return rows
