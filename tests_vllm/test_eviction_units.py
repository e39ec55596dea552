"""kvlab.vllm.eviction, page_layout and engine's spec/manager against brute force, on vLLM's own objects
(no engine: seconds)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kvlab.methods import make_method
from kvlab.vllm import eviction, page_layout
from kvlab.vllm.methods import kv_compress, streaming

H, G, D = 2, 2, 64


# ---------------------------------------------------------------- the CPU kernel's page layout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_and_move_through_the_kernels_own_page_layout(dtype):
    from vllm import _custom_ops as ops

    page, blocks, n = 32, 8, 150
    cache = torch.zeros(blocks, H, page, 2 * D, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, H, 2 * page, D).chunk(2, dim=2)
    keys, values = torch.randn(n, H, D).to(dtype), torch.randn(n, H, D).to(dtype)
    table = torch.tensor([5, 2, 7, 1, 4], dtype=torch.int32)  # a request's pages, shuffled
    pos = torch.arange(n)
    slots = table[pos // page].long() * page + pos % page
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    maps = page_layout.page_maps(dtype, page, D, "vec")
    k, v = page_layout.gather(cache, maps, table[pos // page], pos % page)
    assert torch.equal(k, keys) and torch.equal(v, values)
    src = torch.stack([torch.tensor(sorted(random.Random(h).sample(range(n), 40))) for h in range(H)])
    page_layout.move_per_head(cache, maps, table, src, page)
    k, v = page_layout.gather(cache, maps, table[pos[:40] // page], pos[:40] % page)
    for h in range(H):
        assert torch.equal(k[:, h], keys[src[h], h]) and torch.equal(v[:, h], values[src[h], h])


# ---------------------------------------------------------------- rules both sides share
def test_streaming_never_frees_a_page_a_present_or_later_query_reads():
    for n, budget, n_sink, page in itertools.product([40, 300, 1000], [0.1, 0.25, 0.5, 1.0], [0, 4, 40], [32, 128]):
        method = make_method("streaming", budget=budget, n_sink=n_sink)
        w = streaming.streaming_window(method, n)
        for processed in range(n - 3, n + 300, 7):
            first, last = streaming.streaming_free_range(method, n, processed, page)
            if processed < n or w == 0:
                assert (first, last) == (0, 0)
                continue
            freed = set(range(first * page, last * page))
            for p in range(processed, processed + 50):  # this query and later ones
                read = set(range(min(n_sink, p + 1))) | set(range(max(0, p - w), p + 1))
                assert not freed & read
            if last > first:  # and it frees everything between the sinks and the window it can
                assert (last + 1) * page > processed - w
    full = make_method("streaming", budget=1.0)
    assert streaming.streaming_window(full, 1000) == 0
    assert streaming.streaming_window(make_method("streaming", budget=0.003, n_sink=4), 1000) == 0  # no window


def test_kv_compress_pages_hold_the_protected_tokens_and_a_full_budget_keeps_everything():
    for n, ratio, protected, n_sink, page in itertools.product([100, 777, 3000], [0.0, 0.5, 0.75, 0.97], [8, 64],
                                                               [0, 4], [32, 128]):
        method = make_method("kv-compress", ratio=ratio, protected=protected, n_sink=n_sink, rates="uniform")
        m = kv_compress.kv_compress_pages(method, n, page)
        if ratio == 0.0:
            assert m is None
            continue
        if m is None:
            continue
        tail = n % page
        in_full = min(n // page * page, max(0, protected - tail) + n_sink)  # protected tokens in the full pages
        assert m < n // page and m * page >= in_full
        assert m * page + tail <= method.tokens_kept(n) or m == -(-in_full // page)  # the budget, or protection
    assert kv_compress.kv_compress_pages(make_method("kv-compress", ratio=0.5), 8, 32) is None  # not beyond the window


def test_compacted_rows_read_the_kept_pages_then_the_tail():
    table = torch.arange(1, 41, dtype=torch.int32).view(4, 10)
    seq = torch.tensor([300, 200, 130, 310], dtype=torch.int32)
    new_table, new_seq = eviction.compact_rows(table, seq, torch.tensor([0, 3]), torch.tensor([2, 0]),
                                               torch.tensor([7, 9]), page=32)
    assert new_table[0, :5].tolist() == [1, 2, 8, 9, 10] and int(new_seq[0]) == 2 * 32 + 300 - 7 * 32 == 140
    assert new_table[3, :1].tolist() == [40] and int(new_seq[3]) == 310 - 9 * 32
    assert torch.equal(new_table[1:3], table[1:3]) and new_seq[1:3].tolist() == [200, 130]
    assert int(new_table[0, 5:].abs().sum()) == 0 and torch.equal(table[0], torch.arange(1, 11, dtype=torch.int32))


def paged(lengths, page, seed=0, dtype=torch.float32):
    """A vec-layout cache holding each request's K/V, its shuffled table, and the logical K/V."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for n in lengths]
    blocks = sum(pages) + 3
    perm = torch.randperm(blocks - 1, generator=g) + 1
    cache = torch.zeros(blocks, H, page, 2 * D, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, H, 2 * page, D).chunk(2, dim=2)
    table = torch.zeros(len(lengths), max(pages) + 2, dtype=torch.int32)
    kv, used = [], 0
    for r, n in enumerate(lengths):
        table[r, :pages[r]] = perm[used:used + pages[r]].to(torch.int32)
        used += pages[r]
        k, v = torch.randn(n, H, D, generator=g).to(dtype), torch.randn(n, H, D, generator=g).to(dtype)
        pos = torch.arange(n)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, table[r, pos // page].long() * page + pos % page,
                                       "vec", k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        kv.append((k, v))
    return cache, table, kv


def test_streaming_attention_is_sinks_plus_window_by_brute_force():
    page, n_sink = 32, 4
    method = make_method("streaming", budget=0.25, n_sink=n_sink)
    prompts = [400, 300, 500, 333]
    computed = [400, 330, 200, 333]  # decodes 0 and 1, a prefill, a row whose next token is its first decode
    queries = [1, 1, 40, 3]  # row 3: three tokens after its prompt in one step (a resumed request)
    seqs = [c + q for c, q in zip(computed, queries, strict=True)]
    cache, table, kv = paged(seqs, page)
    qsl = torch.tensor([0, *itertools.accumulate(queries)])
    rows = eviction.Rows(["a", "b", "c", "d"], torch.tensor(prompts), torch.tensor(computed), torch.tensor(seqs), qsl)
    windows = torch.tensor([streaming.streaming_window(method, n) for n in prompts])
    read, idx, keep, skip_to = streaming.streaming_plan(rows, windows, n_sink, table, page)
    assert idx.tolist() == [0, 1, 3] and skip_to.tolist() == [400 // 32, 330 // 32, 333 // 32]
    query = torch.randn(int(qsl[-1]), H * G, D)
    out = torch.full((int(qsl[-1]), H * G * D), 7.0)
    maps = page_layout.page_maps(torch.float32, page, D, "vec")
    streaming.streaming_attention(read, query, cache, maps, 0.125, out)
    for r in (0, 1, 3):
        k, v = kv[r]
        w = int(windows[r])
        for j in range(queries[r]):
            p = computed[r] + j
            seen = [t for t in range(p + 1) if t < n_sink or t >= p - w]
            q = query[int(qsl[r]) + j].view(H, G, D)
            logits = torch.einsum("hgd,thd->hgt", q, k[seen]) * 0.125
            want = torch.einsum("hgt,thd->hgd", torch.softmax(logits, -1), v[seen]).reshape(-1)
            torch.testing.assert_close(out[int(qsl[r]) + j], want, rtol=1e-5, atol=1e-5)
    assert bool((out[int(qsl[2]):int(qsl[3])] == 7.0).all())  # the prefill row keeps the kernel's output


def test_window_scores_equal_kvlab_kv_compress_metric():
    """The vLLM-side metric of one prompt equals kvlab's own (KVCompress._observe + pooling) on the same tensors."""
    from kvlab.attention.probs import attention_probs
    from kvlab.cache.store import KVStore
    from kvlab.methods.kv_compress import paged_scores, pool_metric, window_metric

    n, page, w = 300, 32, 8
    method = make_method("kv-compress", ratio=0.75, rates="uniform", n_sink=4)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g)
    queries = torch.randn(w, H * G, D, generator=g)
    store = KVStore.empty(num_layers=1, batch=1, kv_heads=H, head_dim=D, block_size=16)
    store.layers[0].append(keys.permute(1, 0, 2)[None], values.permute(1, 0, 2)[None], torch.arange(n)[None, :])
    probs = attention_probs(store.layers[0], queries.permute(1, 0, 2)[None], torch.arange(n - w, n)[None], 0.125)
    want = paged_scores(pool_metric(window_metric(probs, "l2").reshape(H, -1), 7)[:, : n // page * page], n, 8, 4)
    got = kv_compress.window_scores(method, queries, keys, 0.125, page)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert bool(torch.isinf(got[:, :4]).all()) and not bool(torch.isinf(got[:, 4:100]).any())


# ---------------------------------------------------------------- vLLM's registry, grouping and block pool
def spec(**kw):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=32, num_kv_heads=H, head_size=D, dtype=torch.float32, **kw)


def evict_spec(section, slot=-1):
    import dataclasses
    import json

    from kvlab.vllm.engine import KVLabEvictSpec

    base = spec()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    return KVLabEvictSpec(**fields, kvlab=json.dumps(section), layer_slot=slot)


def test_the_spec_is_registered_beside_vllms_own():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from kvlab.vllm.engine import KVLabEvictManager

    assert KVCacheSpecRegistry.get_manager_class(spec()) is FullAttentionManager
    assert KVCacheSpecRegistry.get_manager_class(evict_spec({"method": "streaming"})) is KVLabEvictManager
    assert evict_spec({"method": "streaming", "budget": 0.25}).prefix_cacheable
    assert not evict_spec({"method": "kv-compress", "budget": 0.25}).prefix_cacheable


def test_one_group_per_request_or_one_per_layer():
    from vllm.v1.core.kv_cache_utils import is_kv_cache_spec_uniform
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    section = {"method": "kv-compress", "budget": 0.25}
    uniform = {f"layer.{i}": evict_spec(section) for i in range(4)}
    per_layer = {f"layer.{i}": evict_spec(section, slot=i) for i in range(4)}
    assert is_kv_cache_spec_uniform(uniform)
    assert not is_kv_cache_spec_uniform(per_layer)
    assert UniformTypeKVCacheSpecs.from_specs(per_layer) is None  # so vLLM's hybrid path: one group per layer


def manager(section, blocks=64, page=32):
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.single_type_kv_cache_manager import get_manager_for_kv_cache_spec

    pool = BlockPool(num_gpu_blocks=blocks, enable_caching=False, hash_block_size=page)
    return get_manager_for_kv_cache_spec(evict_spec(section), max_in_flight_tokens=2048, max_model_len=4096,
                                         block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                         scheduler_block_size=page), pool


def allocate(mgr, req, tokens):
    mgr.allocate_new_blocks(req, tokens, tokens)


def test_the_manager_frees_streaming_gaps_on_vllms_block_pool():
    mgr, pool = manager({"method": "streaming", "budget": 0.25, "n_sink": 4})
    allocate(mgr, "r", 1000)  # 32 pages
    before = pool.get_num_free_blocks()
    mgr.remove_skipped_blocks("r", 999, num_prompt_tokens=1000)  # still prefilling: nothing
    assert pool.get_num_free_blocks() == before
    mgr.remove_skipped_blocks("r", 1000, num_prompt_tokens=1000)  # W = 246: pages [1, (1000 - 246) // 32)
    assert pool.get_num_free_blocks() == before + 23 - 1
    blocks = mgr.req_to_blocks["r"]
    assert not blocks[0].is_null and all(b.is_null for b in blocks[1:23]) and not blocks[23].is_null
    mgr.free("r")
    assert pool.get_num_free_blocks() == before + 32


def test_the_manager_frees_kv_compress_pages_only_once_reported():
    mgr, pool = manager({"method": "kv-compress", "budget": 0.25})
    allocate(mgr, "r", 1000)
    before = pool.get_num_free_blocks()
    mgr.remove_skipped_blocks("r", 1000, num_prompt_tokens=1000)
    assert pool.get_num_free_blocks() == before  # the worker has not moved anything yet
    mgr.kvlab_kept["r"] = 7
    mgr.remove_skipped_blocks("r", 1001, num_prompt_tokens=1000)
    assert pool.get_num_free_blocks() == before + 1000 // 32 - 7
    mgr.free("r")
    assert "r" not in mgr.kvlab_kept and pool.get_num_free_blocks() == before + 32


def test_the_manager_frees_a_held_scorers_pages_behind_each_reported_compaction():
    mgr, pool = manager({"method": "h2o", "budget": 0.25})
    allocate(mgr, "r", 1000)
    before = pool.get_num_free_blocks()
    mgr.remove_skipped_blocks("r", 1000, num_prompt_tokens=1000)
    assert pool.get_num_free_blocks() == before  # nothing reported yet
    mgr.kvlab_kept["r"] = (8, 1000)  # 250 tokens kept per KV head, in 8 pages; the rest from position 1000
    mgr.remove_skipped_blocks("r", 1001, num_prompt_tokens=1000)
    assert pool.get_num_free_blocks() == before + 1000 // 32 - 8
    allocate(mgr, "r", 1100)  # decoding on: 3 more pages
    mgr.kvlab_kept["r"] = (8, 1064)  # compacted at position 1064: pages [8, 33) read by nobody
    mgr.remove_skipped_blocks("r", 1100, num_prompt_tokens=1000)
    assert pool.get_num_free_blocks() == before - 3 + 33 - 8
    blocks = mgr.req_to_blocks["r"]
    assert all(not b.is_null for b in blocks[:8]) and all(b.is_null for b in blocks[8:33])
    assert all(not b.is_null for b in blocks[33:])


def test_a_resumed_requests_prefill_ends_at_its_prompts_end():
    from kvlab.vllm.engine import prompt_end_cut

    assert prompt_end_cut(100, 0, 150) == 100  # prompt and outputs: the prompt first
    assert prompt_end_cut(100, 40, 80) == 60
    assert prompt_end_cut(100, 0, 80) == 80  # a chunk inside the prompt, as vLLM cut it
    assert prompt_end_cut(100, 100, 50) == 50  # the outputs, after the prompt's step
    assert prompt_end_cut(100, 120, 1) == 1  # decoding
