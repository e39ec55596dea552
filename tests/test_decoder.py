"""The decode driver as values that travel (issue 23): a step's plan lives in the call chain, never on the method,
so decoders can be stepped in turn in one process, and the decode's rate counts the steps it ran."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.generation import Decoder, decode, prefill
from kvlab.methods import make_method
from kvlab.methods.base import StepPlan
from kvlab.methods.routing import RoutePlan

STEPS = 12


@pytest.fixture(scope="module")
def qwen():
    model, _ = kvlab.load("random:tiny-qwen2")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (300,), generator=gen).tolist(), torch.randint(0, 256, (217,), generator=gen).tolist()]
    return model, prefill(model, ids, block_size=16, reserve_tokens=STEPS + 4)


def _plans_held(method) -> list[str]:
    """Attributes of ``method`` that hold a step plan or a layer's route plan (directly or in a container)."""
    held = []
    for name, value in vars(method).items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (StepPlan, RoutePlan)) for v in values):
            held.append(name)
    return held


def test_two_decoders_stepped_in_turn_decode_as_alone(qwen):
    model, snap = qwen
    specs = [("block-route", {"budget": 0.25, "dense_layers": 0}),
             ("cluster-route", {"budget": 0.5, "dense_layers": 0})]
    alone = [decode(model, snap, make_method(n, **p), STEPS, return_logits=True) for n, p in specs]
    methods = [make_method(n, **p) for n, p in specs]
    decoders = [Decoder(model, snap, m, STEPS, return_logits=True) for m in methods]
    while not all(d.done() for d in decoders):
        for d in decoders:
            if not d.done():
                d.step(d.plan())
    for d, m, ref in zip(decoders, methods, alone, strict=True):
        out = d.finish()
        assert torch.equal(out.tokens, ref.tokens) and (out.logits - ref.logits).abs().max() <= 1e-5
        assert _plans_held(m) == [], f"{m.name} keeps a plan between steps"


def test_a_method_plans_afresh_after_a_decode(qwen):
    """A method used after a decode gets its plan from the same call as inside one: nothing of the decode's last
    step is picked up."""
    model, snap = qwen
    used = make_method("block-route", budget=0.25, dense_layers=0)
    decode(model, snap, used, STEPS)
    fresh = make_method("block-route", budget=0.25, dense_layers=0)
    query = torch.randn(2, 6, 1, snap.store.layers[1].head_dim, generator=torch.Generator().manual_seed(5))
    reads = []
    for method in (used, fresh):
        store = snap.store.clone()
        plan = method.plan_step(store, StepPlan(0, new_tokens=0))
        reads.append(method.decode_plan(1, store.layers[1], query, plan))
    assert torch.equal(reads[0].index, reads[1].index)


def test_the_rate_counts_the_steps_run(qwen):
    """Steps run past the end (flags read every ``eos_every`` steps) are charged per step, not per token kept."""
    model, snap = qwen
    one = prefill(model, snap.prompt_ids[:1], block_size=16, reserve_tokens=STEPS + 4)
    tokens = decode(model, one, make_method("full"), STEPS).tokens[0].tolist()
    end = next(i for i in range(2, STEPS) if tokens[i] not in tokens[:i])  # the first new token from index 2 on
    late = decode(model, one, make_method("full"), STEPS, eos_token_id=tokens[end], eos_every=8)
    assert late.steps == end and late.steps_run == 8 and late.tokens.shape[1] == end + 1
    assert late.seconds_per_step == pytest.approx(late.decode_seconds / 8)
    prompt = decode(model, one, make_method("full"), STEPS, eos_token_id=tokens[end])  # the CPU reads every step
    assert prompt.steps == prompt.steps_run == end and torch.equal(prompt.tokens, late.tokens)
