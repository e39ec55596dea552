"""streaming and kv-compress inside a real vLLM engine on the tiny random-weight model: the same tokens as
kvlab's own methods (kept sets included), and blocks really back in vLLM's pool by vLLM's own accounting.

One engine per method (module-scoped), 32-token pages, steps of at most 1496 tokens: the 1500-token
prompt's observation window spans two prefill steps, and the 700-token prompt is compressed in a step that
also decodes the other two with their compacted block tables.
"""

from __future__ import annotations

import pytest

from conftest import LENGTHS, greedy, prompts, start_llm, stop_llm

PAGE = 32
BLOCKS = 256  # vLLM's pool, in 32-token pages (per layer-page with rates=layer: x layers)
EVICT_LENGTHS = (1500, 1000, 700)
NEW = 24
MEMORY_PROMPT = 1500


def start(tiny_model, section, layers=1, blocks=BLOCKS, **kw):
    from kvlab.vllm import config as kvconfig

    return start_llm(tiny_model, section, block_size=PAGE, worker_cls=kvconfig.WORKER_CLS,
                     scheduler_cls=kvconfig.SCHEDULER_CLS, num_gpu_blocks_override=blocks * layers,
                     max_num_batched_tokens=1496, disable_log_stats=False,
                     enable_prefix_caching=kvconfig.parse(section, PAGE).adapter.prefix_cache_off() is None, **kw)


def blocks_in_use(llm, pool) -> int:
    """vLLM's own gauge: ``vllm:kv_cache_usage_perc`` is ``1 - free / (num_blocks - 1)``."""
    usage = next(m.value for m in llm.get_metrics() if m.name == "vllm:kv_cache_usage_perc")
    return round(usage * (pool - 1))


def step_usage(llm, pool, n=MEMORY_PROMPT, max_tokens=40, seed=99):
    """One fresh request stepped through the engine: blocks in use after every engine step."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request("memory", prompts([n], seed=seed)[0], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                             ignore_eos=True, detokenize=False))
    usage = []
    while engine.has_unfinished_requests():
        engine.step()
        usage.append(blocks_in_use(llm, pool))
    while usage and usage[0] == 0:  # a step before the request was scheduled (or the gauge caught up)
        usage.pop(0)
    while usage and usage[-1] == 0:  # the step that finished the request gave every block back
        usage.pop()
    return usage


def run(tiny_model, section, layers=1):
    """Greedy tokens of :data:`EVICT_LENGTHS`, the kv-compress choices, and the memory steps, one engine."""
    from kvlab.vllm.engine import kept_record

    llm = start(tiny_model, section, layers)
    try:
        batch = prompts(EVICT_LENGTHS, seed=5)
        out = {"tokens": greedy(llm, batch, NEW), "kept": llm.apply_model(kept_record)[0]}
        if section["method"] == "streaming":  # the same prompt again: a prefix-cache hit over freed pages
            out["again"] = greedy(llm, batch[:1], NEW)[0]
            out["hits"] = next(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")
        out["usage"] = step_usage(llm, BLOCKS * layers)
        out["kept_after"] = llm.apply_model(kept_record)[0]  # with the memory prompt's choice last
    finally:
        stop_llm(llm)
    return out


def kvlab_reference(model, method_name, new=NEW, **params):
    """kvlab's own method on the same prompts (each alone): greedy tokens, and for kv-compress the positions
    every layer and KV head keeps after prefill."""
    import kvlab
    from kvlab.generation import decode, prefill
    from kvlab.methods.base import PrefillContext

    tokens, kept = [], []
    observe = max(8, kvlab.make_method(method_name, **params).observation_window())
    for prompt in prompts(EVICT_LENGTHS, seed=5):
        ids = prompt["prompt_token_ids"]
        snap = prefill(model, [ids], block_size=PAGE, observe=observe)
        result = decode(model, snap, kvlab.make_method(method_name, **params), max_new_tokens=new)
        tokens.append(result.tokens[0].tolist())
        if method_name == "kv-compress":
            store = snap.store.clone()
            ctx = PrefillContext(context_lengths=snap.context_lengths.clone(), queries=snap.queries,
                                 scaling=snap.scaling, num_query_heads=snap.num_query_heads)
            kvlab.make_method(method_name, **params).prefill_end(store, ctx)
            kept.append([[store.layers[i].row_view(h)[2].tolist() for h in range(store.kv_heads)]
                         for i in range(store.num_layers)])
    return tokens, kept


def same_kept(vllm_record, kvlab_kept):
    """vLLM's kept positions per layer and head (its full pages) plus the prompt's partial page == kvlab's."""
    by_length = {r["n"]: r for r in vllm_record}
    assert sorted(by_length) == sorted(EVICT_LENGTHS)
    for n, per_layer in zip(EVICT_LENGTHS, kvlab_kept, strict=True):
        record = by_length[n]
        tail = list(range(n // PAGE * PAGE, n))
        for layer, heads in enumerate(per_layer):
            assert [got + tail for got in record["kept"][layer]] == heads, (n, layer)
    return by_length


# ---------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def streaming(tiny_model):
    return run(tiny_model, {"method": "streaming", "budget": 0.25, "n_sink": 4})


def test_streaming_gives_kvlabs_streaming_tokens(streaming, kvlab_model):
    tokens, _ = kvlab_reference(kvlab_model, "streaming", budget=0.25, n_sink=4)
    assert streaming["tokens"] == tokens


def test_streaming_keeps_prefix_caching_over_freed_pages(streaming):
    assert streaming["hits"] >= EVICT_LENGTHS[0] // PAGE * PAGE - PAGE  # the repeated prompt hit its pages
    assert streaming["again"] == streaming["tokens"][0]


def test_streaming_gives_the_gap_back_to_vllms_pool(streaming):
    usage = streaming["usage"]
    prefill = -(-MEMORY_PROMPT // PAGE)  # 47 pages, two prefill steps
    window = int(0.25 * MEMORY_PROMPT) - 4
    assert max(usage[:2]) == prefill
    gap = (MEMORY_PROMPT - window) // PAGE - 1  # pages between the sink page and the window: [1, 35)
    assert usage[2] == prefill - gap, usage
    assert max(usage[2:]) <= 1 + -(-(window + 40) // PAGE) + 1  # sink page + window + the newest page, no growth


# ---------------------------------------------------------------- kv-compress, one rate per request
@pytest.fixture(scope="module")
def kv_compress(tiny_model):
    return run(tiny_model, {"method": "kv-compress", "budget": 0.25})


def test_kv_compress_keeps_kvlabs_tokens_and_gives_its_tokens(kv_compress, kvlab_model):
    tokens, kept = kvlab_reference(kvlab_model, "kv-compress", budget=0.25, rates="uniform")
    records = same_kept(kv_compress["kept"], kept)
    assert {n: r["pages"] for n, r in records.items()} == {1500: {0: 10}, 1000: {0: 7}, 700: {0: 4}}
    assert kv_compress["tokens"] == tokens


def test_kv_compress_at_ratio_three_quarters_frees_by_vllms_own_accounting(kv_compress):
    usage = kv_compress["usage"]
    prefill = -(-MEMORY_PROMPT // PAGE)
    unprotected = MEMORY_PROMPT // PAGE  # full pages; the 8 protected tokens sit in the partial last page
    assert max(usage[:2]) == prefill
    freed = prefill - usage[2]  # the first decode step: the scheduler frees what the worker reported
    assert freed >= 0.7 * unprotected and freed == unprotected - 10
    assert max(usage[2:]) <= usage[2] + 2  # then only the new tokens' pages


# ---------------------------------------------------------------- kv-compress, one rate per layer
@pytest.fixture(scope="module")
def kv_compress_layers(tiny_model):
    return run(tiny_model, {"method": "kv-compress", "budget": 0.25, "rates": "layer"}, layers=4)


def test_kv_compress_per_layer_rates_match_kvlab_and_free_each_layers_pages(kv_compress_layers, kvlab_model):
    tokens, kept = kvlab_reference(kvlab_model, "kv-compress", budget=0.25, rates="layer")
    records = same_kept(kv_compress_layers["kept"], kept)
    pages = records[1500]["pages"]
    assert sorted(pages) == [0, 1, 2, 3] and sum(pages.values()) == 4 * 10  # one sort over the 4 layers
    assert len(set(pages.values())) > 1  # the layers got different lengths
    assert kv_compress_layers["tokens"] == tokens
    usage = kv_compress_layers["usage"]  # layer-pages: 4 per token page
    memory = kv_compress_layers["kept_after"][-1]
    assert memory["n"] == MEMORY_PROMPT and len(kv_compress_layers["kept_after"]) == len(EVICT_LENGTHS) + 1
    assert max(usage[:2]) == 4 * -(-MEMORY_PROMPT // PAGE)
    assert usage[2] == sum(m + 1 for m in memory["pages"].values())  # kept pages + the partial page, per layer


# ---------------------------------------------------------------- ratio 0: vanilla
def test_kv_compress_at_ratio_zero_is_vanilla_vllm(tiny_model, vanilla_tokens):
    from kvlab.vllm import config as kvconfig
    from kvlab.vllm.engine import kept_record

    llm = start_llm(tiny_model, {"method": "kv-compress", "ratio": 0.0}, worker_cls=kvconfig.WORKER_CLS,
                    scheduler_cls=kvconfig.SCHEDULER_CLS, enable_prefix_caching=False, disable_log_stats=False,
                    num_gpu_blocks_override=BLOCKS)
    try:
        tokens = greedy(llm, prompts(LENGTHS, seed=0))
        usage = step_usage(llm, BLOCKS, n=1000)
        record = llm.apply_model(kept_record)[0]
    finally:
        stop_llm(llm)
    assert tokens == vanilla_tokens[1]
    assert record == [] and usage == sorted(usage)  # nothing compressed, nothing freed


# ---------------------------------------------------------------- decode-time eviction: tova, h2o
HELD_NEW = 150  # four compactions (every 32 steps)


def held_reference(model, name):
    """kvlab's own method on :data:`EVICT_LENGTHS` (each alone): greedy tokens, and the first step whose top-2
    logits are within 1e-3 (float32 summation order decides such a step; after it greedy paths may part)."""
    import kvlab
    from kvlab.generation import decode, prefill

    out = []
    for prompt in prompts(EVICT_LENGTHS, seed=5):
        snap = prefill(model, [prompt["prompt_token_ids"]], block_size=PAGE, observe=64)
        result = decode(model, snap, kvlab.make_method(name, budget=0.25), max_new_tokens=HELD_NEW, return_logits=True)
        top = result.logits[0].topk(2, dim=-1).values
        near = (top[:, 0] - top[:, 1] < 1e-3).tolist() + [True]
        out.append((result.tokens[0].tolist(), near.index(True)))
    return out


@pytest.mark.parametrize("name", ["tova", "h2o"])
def test_decode_time_eviction_gives_kvlabs_tokens_in_flat_memory(tiny_model, kvlab_model, name):
    """Three prompts decoded together for 150 steps while the method evicts a token per KV head and step:
    kvlab's own engine's greedy tokens (up to a near-tie of the logits, past a compaction); one
    request's blocks, by vLLM's own gauge, stay at the kept tokens' pages plus the pages since the last
    compaction, however long it decodes."""
    llm = start(tiny_model, {"method": name, "budget": 0.25})
    try:
        tokens = greedy(llm, prompts(EVICT_LENGTHS, seed=5), HELD_NEW)
        usage = step_usage(llm, BLOCKS, max_tokens=HELD_NEW)
    finally:
        stop_llm(llm)
    reference = held_reference(kvlab_model, name)
    for n, got, (want, tie) in zip(EVICT_LENGTHS, tokens, reference, strict=True):
        assert tie > 32, (n, tie)  # a compaction at least before greedy decoding meets a near-tie
        assert got[:tie] == want[:tie], (n, tie)
    assert max(tie for _, tie in reference) >= 100  # and four in one of them
    kept_pages = -(-MEMORY_PROMPT // 4 // PAGE)  # 375 tokens per KV head
    assert max(usage[:2]) == -(-MEMORY_PROMPT // PAGE)
    held = usage[2:]  # from the first decode step: the prompt's other pages are back in the pool
    assert len(held) >= HELD_NEW - 2 and max(held) <= kept_pages + 1 + -(-32 // PAGE) + 1, held
    assert held[-1] <= held[0] + 1  # flat: vanilla would have grown by 150 tokens' pages


def test_a_prompt_shorter_than_budget_tokens_grows_to_it_then_is_held(tiny_model):
    """``budget_tokens=128`` and a 64-token prompt: nothing to evict at the prompt's end; the request grows to
    128 tokens per KV head while decoding, then holds there (vanilla would reach 12 pages in 300 steps)."""
    llm = start(tiny_model, {"method": "tova", "budget_tokens": 128})
    try:
        usage = step_usage(llm, BLOCKS, n=64, max_tokens=300)
    finally:
        stop_llm(llm)
    assert len(usage) >= 298 and usage[0] == 2  # the prompt's 2 pages
    bound = 128 // PAGE + -(-33 // PAGE) + 1  # the kept pages, the pages since the last compaction, a boundary
    assert max(usage) >= 128 // PAGE and max(usage) <= bound, usage


# ---------------------------------------------------------------- preemption of a compressed request
def alone_and_together(tiny_model, section, pool, lengths, seed, new=300):
    """Greedy tokens of each prompt alone, then of all at once on a ``pool``-page engine, and how many
    preemptions vLLM counted while they ran together."""
    from vllm import SamplingParams

    llm = start(tiny_model, section, blocks=pool, max_num_seqs=4, max_model_len=(pool - 1) * PAGE)
    try:
        batch = prompts(lengths, seed=seed)
        alone = [greedy(llm, [p], new)[0] for p in batch]
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, detokenize=False)
        before = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        together = [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]
        preempted = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions") - before
    finally:
        stop_llm(llm)
    return alone, together, preempted


def test_a_preempted_compressed_request_is_recomputed_to_the_tokens_it_gives_alone(tiny_model):
    """Three requests that outgrow a 36-page pool while decoding: vLLM preempts one (its blocks, kept pages
    included, go back) and recomputes it, prompt and outputs. kvlab's scheduler ends that prefill at the
    prompt's end, so the prompt is compressed again before the outputs are recomputed against it: every
    request gives the tokens it gives alone."""
    alone, together, preempted = alone_and_together(tiny_model, {"method": "kv-compress", "budget": 0.25}, 36,
                                                    (600, 650, 700), seed=11)
    assert preempted >= 1
    assert together == alone


def test_a_preempted_held_request_is_replayed_to_the_tokens_it_gives_alone(tiny_model):
    """H2O held at 256 tokens per KV head, three prompts shorter than that growing to it: the 200-token one is
    held (evicting a token per head and step) well before the other two outgrow the 28-page pool, and vLLM
    preempts it (the last to arrive); recomputed, its prompt ends a step, then its outputs are replayed through
    the method's own steps, victims included: every request gives the tokens it gives alone."""
    alone, together, preempted = alone_and_together(tiny_model, {"method": "h2o", "budget_tokens": 256}, 28,
                                                    (100, 150, 200), seed=13)
    assert preempted >= 1
    assert together == alone
