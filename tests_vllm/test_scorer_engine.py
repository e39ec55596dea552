"""Every scorer press inside a real vLLM engine on the tiny random-weight model, through one adapter
(kvlab.vllm.methods.scorers): the positions each layer and KV head keeps equal kvlab's own method run in whole
pages of vLLM's page size (``page=32``) -- up to a swap of tokens whose kvlab scores tie to 1e-4 (vLLM computes
the keys and queries with its own kernels: SnapKV's pooled scores of neighbouring tokens can differ in the last
bits) -- the greedy tokens are kvlab's, and at ratio 0.75 vLLM's own accounting shows the pages back in its pool.
One engine per method, 32-token pages (see test_eviction_engine.py)."""

from __future__ import annotations

import pytest
import torch
from test_eviction_engine import BLOCKS, PAGE, start, step_usage

from conftest import greedy, prompts, stop_llm

LENGTHS = (1500, 1000, 700)  # test_eviction_engine.EVICT_LENGTHS, which same_kept checks
NEW = 8
SCORERS = [("snapkv", {"window": 16}), ("pyramidkv", {"window": 16, "beta": 4}), ("knorm", {}), ("random", {}),
           ("tova", {}), ("h2o", {"window": 16})]
HELD = ("tova", "h2o")  # here at the prompt's end only, in whole pages (decode_evict=false; test_eviction_engine)


def run(tiny_model, name, params, ratio):
    from kvlab.vllm.engine import kept_record

    section = {"method": name, "ratio": ratio, **params, **({"decode_evict": False} if name in HELD else {})}
    llm = start(tiny_model, section, layers=4 if name == "pyramidkv" else 1)
    try:
        out = {"tokens": greedy(llm, prompts(LENGTHS, seed=5), NEW), "kept": llm.apply_model(kept_record)[0]}
        out["usage"] = step_usage(llm, BLOCKS * (4 if name == "pyramidkv" else 1), max_tokens=4)
        out["memory"] = llm.apply_model(kept_record)[0][-1]
    finally:
        stop_llm(llm)
    return out


def kvlab_reference(model, name, params, ratio):
    """kvlab's own method in whole 32-token pages on the same prompts (each alone): greedy tokens, the positions
    every layer and KV head keeps after prefill, and the scores it chose them by."""
    import kvlab
    from kvlab.generation import decode, prefill
    from kvlab.methods.base import PrefillContext

    extra = {"decode_evict": False} if name in HELD else {}
    tokens, kept, scores = [], [], []
    for prompt in prompts(LENGTHS, seed=5):
        snap = prefill(model, [prompt["prompt_token_ids"]], block_size=PAGE, observe=64)
        tokens.append(decode(model, snap, kvlab.make_method(name, ratio=ratio, page=PAGE, **params, **extra),
                             max_new_tokens=NEW).tokens[0].tolist())
        store = snap.store.clone()
        ctx = PrefillContext(context_lengths=snap.context_lengths.clone(), queries=snap.queries,
                             scaling=snap.scaling, num_query_heads=snap.num_query_heads)
        method = kvlab.make_method(name, ratio=ratio, page=PAGE, **params, **extra)
        method.prepare(store, ctx)
        scores.append([method.score(i, layer, ctx).reshape(layer.kv_heads, -1) for i, layer in enumerate(store.layers)])
        method.prefill_end(store, ctx)
        kept.append([[store.layers[i].row_view(h)[2].tolist() for h in range(store.kv_heads)]
                     for i in range(store.num_layers)])
    return tokens, kept, scores


def same_kept(vllm_record, kvlab_kept, kvlab_scores, rel=1e-4):
    """vLLM's kept positions per layer and head (its full pages, plus the prompt's partial page) are kvlab's, but
    for tokens swapped at the cut whose kvlab scores agree to ``rel`` of the layer's largest score. Returns the
    prompt lengths whose kept positions are kvlab's exactly."""
    by_length = {r["n"]: r for r in vllm_record}
    assert sorted(by_length) == sorted(LENGTHS)
    exact = set()
    for n, per_layer, layer_scores in zip(LENGTHS, kvlab_kept, kvlab_scores, strict=True):
        tail = list(range(n // PAGE * PAGE, n))
        same = True
        for layer, (heads, score) in enumerate(zip(per_layer, layer_scores, strict=True)):
            finite = score[:, :n][torch.isfinite(score[:, :n])]
            for h, expect in enumerate(heads):
                got = by_length[n]["kept"][layer][h] + tail
                assert len(got) == len(expect), (n, layer, h)
                swapped = sorted(set(got) ^ set(expect))
                assert len(swapped) <= 4, (n, layer, h, swapped)
                if swapped:
                    same = False
                    s = score[h, swapped]
                    assert float(s.max() - s.min()) <= rel * float(finite.abs().max()), (n, layer, h, swapped, s)
        if same:
            exact.add(n)
    return exact


def kvlab_tokens_keeping(model, vllm_record):
    """kvlab's greedy tokens when its store keeps exactly what vLLM kept (per layer and KV head): what vLLM's
    compacted pages must decode to, whatever a tie decided."""
    import dataclasses

    import kvlab
    from kvlab.generation import decode, prefill
    from kvlab.methods import _scoring as S

    by_length = {r["n"]: r for r in vllm_record}
    tokens = []
    for prompt, n in zip(prompts(LENGTHS, seed=5), LENGTHS, strict=True):
        snap = prefill(model, [prompt["prompt_token_ids"]], block_size=PAGE)
        store = snap.store.clone()
        tail = list(range(n // PAGE * PAGE, n))
        for i, layer in enumerate(store.layers):
            keep = torch.zeros(layer.rows, layer.max_length, dtype=torch.bool)
            for h, kept in enumerate(by_length[n]["kept"][i]):
                keep[h, kept + tail] = True
            S.evict(layer, keep)
        compressed = dataclasses.replace(snap, store=store)
        tokens.append(decode(model, compressed, kvlab.make_method("full"), NEW, compress=False).tokens[0].tolist())
    return tokens


@pytest.mark.parametrize("name,params", SCORERS, ids=[n for n, _ in SCORERS])
def test_a_scorer_in_vllm_keeps_kvlabs_tokens_and_frees_its_pages(tiny_model, kvlab_model, name, params):
    vllm = run(tiny_model, name, params, 0.75)
    tokens, kept, scores = kvlab_reference(kvlab_model, name, params, 0.75)
    exact = same_kept(vllm["kept"], kept, scores)
    assert vllm["tokens"] == kvlab_tokens_keeping(kvlab_model, vllm["kept"])
    assert exact and all(vllm["tokens"][i] == tokens[i] for i, n in enumerate(LENGTHS) if n in exact), exact
    pages = {r["n"]: r for r in vllm["kept"]}[1500]["pages"]
    assert (len(set(pages.values())) > 1) == (name == "pyramidkv"), pages  # per layer only where budgets are
    usage, memory = vllm["usage"], vllm["memory"]
    prefill = -(-1500 // PAGE)
    layers = len(memory["pages"])
    assert max(usage[:2]) == layers * prefill
    assert usage[2] == sum(m + 1 for m in memory["pages"].values())  # kept pages + the partial page, per layer
    assert layers * prefill - usage[2] >= 0.7 * layers * (1500 // PAGE)  # ratio 0.75: most pages back in the pool
