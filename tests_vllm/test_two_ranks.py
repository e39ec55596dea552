"""Two ranks (``tensor_parallel_size=2``) on this CPU, the tiny model's two KV heads one per rank: each rank
keeps its own heads' tokens, the page counts that depend on scores are agreed from every rank's scores, and
the scheduler frees only what every rank reported; block-route selects per rank.

vLLM's CPU build binds each rank to a NUMA node and refuses two ranks on one node; ``VLLM_CPU_OMP_THREADS_BIND``
gives each rank its core (``kvlab serve --tensor-parallel-size 2`` sets it the same way).
"""

from __future__ import annotations

import contextlib
import os

import pytest
from test_eviction_engine import (
    BLOCKS,
    EVICT_LENGTHS,
    HELD_NEW,
    MEMORY_PROMPT,
    NEW,
    PAGE,
    held_reference,
    kvlab_reference,
    start,
    step_usage,
)

from conftest import LENGTHS, greedy, prompts, start_llm, stop_llm

pytestmark = pytest.mark.both_cores  # a rank a core

RANKS = 2


@contextlib.contextmanager
def bound_ranks():
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= RANKS, f"two ranks need two cores, this process has {len(cores)}"
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in cores[:RANKS])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def test_kv_compress_per_layer_rates_on_two_ranks_keep_what_one_rank_keeps(tiny_model, kvlab_model):
    """kv-compress ``rates="layer"`` (page counts from one sort of every layer's and head's scores): each rank
    keeps exactly kvlab's positions for its own KV head, both ranks the same page counts, the same greedy
    tokens as kvlab's engine, and vLLM frees the same blocks as with one rank."""
    from kvlab.vllm.engine import kept_record

    layers = 4
    with bound_ranks():
        llm = start(tiny_model, {"method": "kv-compress", "budget": 0.25, "rates": "layer"}, layers,
                    tensor_parallel_size=RANKS)
    try:
        tokens = greedy(llm, prompts(EVICT_LENGTHS, seed=5), NEW)
        records = llm.apply_model(kept_record)
        usage = step_usage(llm, BLOCKS * layers)
        memory = [r[-1] for r in llm.apply_model(kept_record)]
    finally:
        stop_llm(llm)
    want_tokens, want_kept = kvlab_reference(kvlab_model, "kv-compress", budget=0.25, rates="layer")
    assert len(records) == RANKS
    for rank, record in enumerate(records):
        by_length = {r["n"]: r for r in record}
        assert sorted(by_length) == sorted(EVICT_LENGTHS)
        for n, per_layer in zip(EVICT_LENGTHS, want_kept, strict=True):
            tail = list(range(n // PAGE * PAGE, n))
            for layer, heads in enumerate(per_layer):
                assert [got + tail for got in by_length[n]["kept"][layer]] == [heads[rank]], (rank, n, layer)
    pages = [{r["n"]: r["pages"] for r in record} for record in records]
    assert pages[0] == pages[1] and len(set(pages[0][1500].values())) > 1  # agreed, and the layers differ
    assert tokens == want_tokens
    assert memory[0]["pages"] == memory[1]["pages"]
    assert max(usage[:2]) == layers * -(-MEMORY_PROMPT // PAGE)
    assert usage[2] == sum(m + 1 for m in memory[0]["pages"].values())


def test_h2o_on_two_ranks_holds_memory_and_gives_kvlabs_tokens(tiny_model, kvlab_model):
    """H2O evicting while decoding on two ranks (each its own head's victims, compactions reported by both
    and agreed): kvlab's greedy tokens up to the first near-tie, and a request's blocks flat. (TOVA averages
    over every head of a layer: refused on two ranks, tests_vllm/test_serve_errors.py.)"""
    with bound_ranks():
        llm = start(tiny_model, {"method": "h2o", "budget": 0.25}, tensor_parallel_size=RANKS)
    try:
        tokens = greedy(llm, prompts(EVICT_LENGTHS, seed=5), HELD_NEW)
        usage = step_usage(llm, BLOCKS, max_tokens=HELD_NEW)
    finally:
        stop_llm(llm)
    for n, got, (want, tie) in zip(EVICT_LENGTHS, tokens, held_reference(kvlab_model, "h2o"), strict=True):
        assert tie > 32, (n, tie)
        assert got[:tie] == want[:tie], (n, tie)
    kept_pages = -(-MEMORY_PROMPT // 4 // PAGE)
    held = usage[2:]
    assert len(held) >= HELD_NEW - 2 and max(held) <= kept_pages + 1 + -(-32 // PAGE) + 1, held
    assert held[-1] <= held[0] + 1


def test_block_route_on_two_ranks_selects_per_rank(tiny_model, vanilla_tokens):
    """Each rank routes over its own KV head: at a covering budget vanilla's tokens; at 1/4 every selection
    keeps the sink, the newest page and the budget, the two ranks choose different pages somewhere (one rank
    summing both heads' scores would choose the same), and one rank with ``per_head`` chooses and reads the
    same pages per head, giving the same tokens."""
    from kvlab.vllm.backend import recorded_selections, reset_records

    with bound_ranks():
        covering = start_llm(tiny_model, {"method": "block-route", "budget": 1.0}, tensor_parallel_size=RANKS)
    try:
        assert greedy(covering, prompts(LENGTHS, seed=0)) == vanilla_tokens[1]
    finally:
        stop_llm(covering)
    with bound_ranks():
        llm = start_llm(tiny_model, {"method": "block-route", "budget": 0.25}, tensor_parallel_size=RANKS)
    try:
        llm.apply_model(reset_records)
        tokens = greedy(llm, prompts(LENGTHS, seed=0))
        per_rank = llm.apply_model(recorded_selections)
    finally:
        stop_llm(llm)
    assert len(per_rank) == RANKS and len(per_rank[0]) == len(per_rank[1]) > 0
    differ = 0
    for a, b in zip(*per_rank, strict=True):
        assert (a["layer"], a["seq_lens"]) == (b["layer"], b["seq_lens"])
        for n, pages in zip(a["seq_lens"] + b["seq_lens"], a["pages"] + b["pages"], strict=True):
            assert pages[0] == 0 and pages[-1] == -(-n // 128) - 1
        differ += a["pages"] != b["pages"]
    assert differ > 0
    # One rank choosing per KV head (one kernel call per head on its slice of the cache) reads what the two
    # ranks read, each its one head: the same pages per head at every step, the same tokens.
    llm = start_llm(tiny_model, {"method": "block-route", "budget": 0.25, "per_head": True})
    try:
        llm.apply_model(reset_records)
        per_head_tokens = greedy(llm, prompts(LENGTHS, seed=0))
        records = llm.apply_model(recorded_selections)[0]
    finally:
        stop_llm(llm)
    def reads(recs, head=None):  # (layer, tokens of the request) -> pages: the steps batch differently per run
        return {(r["layer"], n): pages if head is None else pages[head]
                for r in recs for n, pages in zip(r["seq_lens"], r["pages"], strict=True)}

    assert [reads(records, h) for h in range(RANKS)] == [reads(recs) for recs in per_rank]
    assert per_head_tokens == tokens


def test_agreed_reports_free_only_what_every_rank_frees():
    """The agreement itself: a request every rank reported, agreed by the adapter (kv-compress: the most kept
    pages; a held scorer: the most kept pages and the earliest compaction); one a rank left out, not reported."""
    from kvlab.vllm.eviction import agree_reports
    from kvlab.vllm.methods.held import HeldScorerAdapter
    from kvlab.vllm.methods.kv_compress import KVCompressAdapter

    reports = [{"a": {0: 3, 1: 2}, "b": {0: 4}}, {"a": {0: 2, 1: 5}}]
    assert agree_reports(reports, lambda v: KVCompressAdapter.agree(None, v)) == {"a": {0: 3, 1: 5}}
    held = [{"r": {0: (3, 900)}}, {"r": {0: (4, 868)}}]
    assert agree_reports(held, lambda v: HeldScorerAdapter.agree(None, v)) == {"r": {0: (4, 868)}}
    assert agree_reports([{"a": {0: 3}}, {"a": {1: 3}}], max) == {}  # not the same groups
