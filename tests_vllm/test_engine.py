"""block-route inside a real vLLM engine, on a tiny random-weight model (four engines): one page list per request
and Quest's bound (``per_head=false score=bound``, shared by module), and the defaults (the centroid, a page list
per KV head, 32-token pages)."""

from __future__ import annotations

import pytest
import torch

from conftest import LENGTHS, NEW_TOKENS, greedy, prompts, start_llm, stop_llm
from kvlab.vllm.backend import recorded_selections, reset_records, summary_snapshot

PAGE = 128


@pytest.fixture(scope="module")
def routed(tiny_model):
    llm = start_llm(tiny_model, {"method": "block-route", "budget": 0.25, "per_head": False, "score": "bound"})
    yield llm
    stop_llm(llm)


def test_full_is_plain_vllm(vanilla_tokens):
    classes, tokens = vanilla_tokens
    assert classes and all(c == "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl" for c in classes)
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(LENGTHS)
    assert len({tuple(t) for t in tokens}) == len(LENGTHS)  # the random model is not degenerate


def test_block_route_at_a_covering_budget_gives_vanilla_tokens(tiny_model, vanilla_tokens):
    llm = start_llm(tiny_model, {"method": "block-route", "budget": 1.0})
    try:
        classes = llm.apply_model(reset_records)[0]
        tokens = greedy(llm, prompts(LENGTHS, seed=0))
    finally:
        stop_llm(llm)
    assert all(c.startswith("kvlab.vllm.backend.KVLabCPUAttentionImpl") for c in classes)
    assert tokens == vanilla_tokens[1]


def test_small_budget_runs_a_mixed_batch_and_every_selection_keeps_sink_newest_and_budget(routed, vanilla_tokens):
    routed.apply_model(reset_records)
    tokens = greedy(routed, prompts(LENGTHS, seed=0))
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(LENGTHS)
    records = routed.apply_model(recorded_selections)[0]
    # 2 dense layers of 4: layers 2 and 3 route, every decode step of the run
    assert {r["layer"] for r in records} == {2, 3}
    assert any(len(r["seq_lens"]) < r["requests"] for r in records), "no step mixed prefills with decodes"
    assert any(len(r["seq_lens"]) == len(LENGTHS) for r in records)
    checked = 0
    for r in records:
        for n, k, read, pages in zip(r["seq_lens"], r["k"], r["read_seq_lens"], r["pages"], strict=True):
            npages = -(-n // PAGE)
            budget_pages = int(0.25 * n) // PAGE
            assert len(pages) == k == min(npages, max(budget_pages, 2))  # sink + newest at least
            assert pages == sorted(set(pages)) and pages[0] == 0 and pages[-1] == npages - 1
            assert read == (k - 1) * PAGE + n - (npages - 1) * PAGE <= max(budget_pages, 2) * PAGE
            checked += 1
    assert checked >= NEW_TOKENS * len(LENGTHS)
    assert tokens != vanilla_tokens[1]  # it really read less than everything


def vec_keys(blocks: torch.Tensor) -> torch.Tensor:
    """Keys ``[n, H, PAGE, D]`` from raw CPU cache blocks ``[n, H, PAGE, 2 * D]`` written for the ``vec``
    instruction set: per (block, head) the first ``PAGE * D`` values are the keys, dimension-major."""
    n, h, page, two_d = blocks.shape
    d = two_d // 2
    return blocks.reshape(n, h, -1)[:, :, : page * d].view(n, h, d, page).transpose(2, 3).float()


def test_the_vec_key_layout_this_test_reads():
    from vllm import _custom_ops as ops

    cache = torch.zeros(2, 2, PAGE, 2 * 64)
    key_cache, value_cache = cache.view(2, 2, 2 * PAGE, 64).chunk(2, dim=2)
    keys = torch.randn(200, 2, 64)
    ops.cpu_attn_reshape_and_cache(keys, -keys, key_cache, value_cache, torch.arange(200), "vec", k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    assert torch.equal(vec_keys(cache).transpose(1, 2).reshape(2 * PAGE, 2, 64)[:200], keys)


def assert_summaries_equal_the_cache(s: dict) -> None:
    """Every sub-page's token count, and its key min/max (``score=bound``) or key sum (``centroid``), recomputed
    from the page's raw cache block."""
    keys, sb = vec_keys(s["blocks"]), s["score_block"]  # [pages, H, page, D]
    for p, count in enumerate(s["tokens"].tolist()):
        for j in range(0, count, sb):
            chunk = keys[p, :, j:min(j + sb, count)]
            assert int(s["count"][p, j // sb]) == chunk.shape[1]
            if "kmin" in s:
                assert torch.equal(s["kmin"][p, j // sb], chunk.amin(1))
                assert torch.equal(s["kmax"][p, j // sb], chunk.amax(1))
            else:
                torch.testing.assert_close(s["ksum"][p, j // sb], chunk.sum(1))


@pytest.mark.parametrize("max_tokens", [1, 60], ids=["after-prefill", "after-60-decode-steps"])
def test_page_summaries_equal_a_recomputation_from_the_cache(routed, max_tokens):
    routed.apply_model(reset_records)
    n = 1000 + max_tokens  # fresh random tokens: no prefix-cache hit, the last page is partial
    greedy(routed, prompts([n], seed=100 + max_tokens), max_tokens=max_tokens)
    snapshot = routed.apply_model(summary_snapshot)[0]
    assert {s["layer"] for s in snapshot} == {2, 3}
    for s in snapshot:
        assert s["isa"] == "vec"  # float32 on this CPU (no AMX); the layout read below
        tokens = s["tokens"].tolist()
        assert sum(tokens) == n + max_tokens - 1  # the last sampled token is never written
        assert min(tokens) == (n + max_tokens - 1) % PAGE  # the partial newest page
        assert "kmin" in s  # score=bound
        assert_summaries_equal_the_cache(s)


def test_small_budget_selection_is_batch_invariant(routed):
    """Pages are chosen per request, so a request's greedy tokens in a mixed batch equal its tokens alone."""
    routed.apply_model(reset_records)
    batch = prompts(LENGTHS, seed=11)  # fresh tokens: no prefix-cache hit on pages whose summaries were reset
    together = greedy(routed, batch)
    alone = [greedy(routed, [p])[0] for p in batch]
    assert together == alone


def test_the_default_centroid_per_kv_head_on_32_token_pages(tiny_model, vanilla_tokens):
    """block-route's defaults in vLLM (kvlab's centroid, a page list per KV head, on the 32-token pages kvlab
    serve gives it): each KV head's selection keeps the sink, the newest page and the budget, the heads choose
    differently somewhere, and the centroid summaries equal the sum of the keys in the cache."""
    page = 32
    llm = start_llm(tiny_model, {"method": "block-route", "budget": 0.25}, block_size=page)
    try:
        llm.apply_model(reset_records)
        tokens = greedy(llm, prompts(LENGTHS, seed=0))
        records = llm.apply_model(recorded_selections)[0]
        snapshot = llm.apply_model(summary_snapshot)[0]
    finally:
        stop_llm(llm)
    differ = 0
    for r in records:
        for n, k, per_head in zip(r["seq_lens"], r["k"], r["pages"], strict=True):
            npages = -(-n // page)
            assert len(per_head) == 2 and all(len(p) == k == min(npages, max(int(0.25 * n) // page, 2))
                                              for p in per_head)
            assert all(p == sorted(set(p)) and p[0] == 0 and p[-1] == npages - 1 for p in per_head)
            differ += per_head[0] != per_head[1]
    assert differ > 0 and tokens != vanilla_tokens[1]
    assert {s["layer"] for s in snapshot} == {2, 3}
    for s in snapshot:
        assert "kmin" not in s and "ksum" in s and s["score_block"] == 16
        assert_summaries_equal_the_cache(s)
