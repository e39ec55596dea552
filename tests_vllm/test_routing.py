"""kvlab.vllm.routing against brute-force references on vLLM-shaped tensors (no engine)."""

from __future__ import annotations

import pytest
import torch

from kvlab.kernels.reference import block_select_ref, key_summaries
from kvlab.methods import make_method
from kvlab.vllm.routing import PageSummaries, compact_block_table, plan_step, select_pages

PAGE, SB, H, G, D = 128, 32, 2, 3, 64


def method(**kw):
    return make_method("block-route", block_size=PAGE, score_block=SB, local_blocks=1, **kw)


def paged_cache(lengths: list[int], num_blocks: int = 64, seed: int = 0):
    """A key cache ``[blocks, H, PAGE, D]`` and a shuffled block table holding ``lengths`` tokens per request."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_blocks, H, PAGE, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(-(-n // PAGE) for n in lengths)
    table = torch.zeros(len(lengths), width + 2, dtype=torch.int32)
    used = 0
    for r, n in enumerate(lengths):
        pages = -(-n // PAGE)
        table[r, :pages] = perm[used:used + pages].to(torch.int32)
        used += pages
    return keys, table


def logical_keys(keys, table, r, n):
    """The first ``n`` keys of request ``r`` in logical order: ``[n, H, D]``."""
    pages = table[r, : -(-n // PAGE)].long()
    return keys[pages].permute(0, 2, 1, 3).reshape(-1, H, D)[:n]


def slots_of(table, r, positions):
    """vLLM's slot mapping: ``block_table[r, p // PAGE] * PAGE + p % PAGE``."""
    positions = torch.as_tensor(positions)
    return table[r, positions // PAGE].long() * PAGE + positions % PAGE


def summarise(lengths, keys, table, bounds, steps=((0, None),)):
    """Write every request's keys into summaries in chunked steps, as vLLM writes them."""
    s = PageSummaries(keys.shape[0], PAGE, SB, H, D, bounds=bounds, device=torch.device("cpu"))
    for r, n in enumerate(lengths):
        k = logical_keys(keys, table, r, n)
        cuts = [0, 700, 701, 702, *range(703, n, 450), n]  # a prefill chunk, single decode tokens, more chunks
        cuts = sorted({c for c in cuts if c <= n})
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            s.update(k[a:b], slots_of(table, r, range(a, b)))
    return s


def reference(keys, table, r, n, j, bounds):
    chunk = logical_keys(keys, table, r, n)[j * SB:(j + 1) * SB]
    return (chunk.amin(0), chunk.amax(0)) if bounds else (chunk.sum(0), len(chunk))


@pytest.mark.parametrize("bounds", [False, True], ids=["centroid", "bound"])
def test_summaries_from_written_keys_equal_a_recomputation(bounds):
    lengths = [300, 1000]
    keys, table = paged_cache(lengths, seed=1)
    s = summarise(lengths, keys, table, bounds)
    for r, n in enumerate(lengths):
        pages = table[r, : -(-n // PAGE)].long()
        for j in range(-(-n // SB)):
            page, sub = int(pages[j // (PAGE // SB)]), j % (PAGE // SB)
            want = reference(keys, table, r, n, j, bounds)
            if bounds:
                torch.testing.assert_close(s.view("kmin")[page, sub], want[0])
                torch.testing.assert_close(s.view("kmax")[page, sub], want[1])
            else:
                torch.testing.assert_close(s.view("ksum")[page, sub], want[0], rtol=1e-5, atol=1e-4)
                assert int(s.view("count")[page, sub]) == want[1]
    assert int(s.tokens()[table[0, 2]]) == 300 - 256  # the partial newest page covers what it holds
    # a freed page reused by another request starts afresh at its first slot
    page = int(table[1, 0])
    s.update(torch.ones(5, H, D), torch.arange(5) + page * PAGE)
    assert int(s.tokens()[page]) == 5
    if not bounds:
        torch.testing.assert_close(s.view("ksum")[page, 0], torch.full((H, D), 5.0))


@pytest.mark.parametrize("groups", [1, H])
@pytest.mark.parametrize("score", ["centroid", "bound"])
def test_selection_is_the_top_pages_by_brute_force_score_with_sink_and_newest(score, groups):
    """One page list per request (scores summed over the KV heads) or one per KV head (``per_head``)."""
    lengths = [2000, 1100, 3000, 700]
    keys, table = paged_cache(lengths, seed=2)
    seq = torch.tensor(lengths, dtype=torch.int32)
    m = method(budget=0.25, score=score)
    plan = plan_step(m, table, seq, num_decodes=len(lengths), page_size=PAGE, score_block=SB, head_groups=groups)
    assert plan is not None
    s = summarise(lengths, keys, table, bounds=score == "bound")
    query = torch.randn(len(lengths), H * G, D, generator=torch.Generator().manual_seed(3))
    physical, logical = select_pages(query, plan, s)
    assert logical.shape[:2] == (len(lengths), groups)
    differ = 0
    for r, n in enumerate(lengths):
        npages = -(-n // PAGE)
        k = int(plan.k[r])
        budget_pages = int(0.25 * n) // PAGE
        assert k == min(npages, max(budget_pages, 2))
        kk = logical_keys(keys, table, r, n)
        for g in range(groups):
            heads = slice(g * H // groups, (g + 1) * H // groups)
            chosen = logical[r, g, :k].tolist()
            assert chosen == sorted(set(chosen)) and chosen[0] == 0 and chosen[-1] == npages - 1
            # brute force: per sub-page score from the raw keys of the group's heads, max over a page's
            # sub-pages, top k of the middle
            q = query[r].view(H, G, D)[heads]
            sub_scores = []
            for j in range(-(-n // SB)):
                chunk = kk[j * SB:(j + 1) * SB, heads]  # [t, heads, D]
                if score == "centroid":
                    sub_scores.append(float((chunk.mean(0) * q.sum(1)).sum()))
                else:
                    lo, hi = chunk.amin(0), chunk.amax(0)
                    sub_scores.append(float(torch.maximum(q * lo[:, None], q * hi[:, None]).sum()))
            page_scores = [max(sub_scores[p * 4:(p + 1) * 4]) for p in range(npages)]
            middle = sorted(range(1, npages - 1), key=lambda p: -page_scores[p])[: k - 2]
            assert chosen == sorted([0, *middle, npages - 1])
            assert physical[r, g, :k].tolist() == table[r, chosen].tolist()
        differ += groups > 1 and logical[r, 0, :k].tolist() != logical[r, 1, :k].tolist()
        assert int(plan.seq_lens[r]) == (k - 1) * PAGE + (n - (npages - 1) * PAGE)
    assert groups == 1 or differ > 0  # the heads chose apart


def kvlab_selection(query, keys, table, lengths, plan, m, score, groups=1):
    """kvlab's own block-route selection (:func:`kvlab.kernels.reference.block_select_ref`: row_block_scores,
    forced_blocks, top_blocks) with one row per request and group of KV heads (one group: all of them, vLLM's
    per-request page list; ``H`` groups: kvlab's row per KV head), the summaries of its keys in logical order
    (key_summaries, as kvlab's BlockMeta makes them) and its queries laid out alike: ``[nd, groups, width]``."""
    nd, width, per = len(lengths), max(-(-n // PAGE) for n in lengths), H // groups
    units = []
    for r, n in enumerate(lengths):
        for g in range(groups):
            k = torch.zeros(width * PAGE, per * D)
            k[:n] = logical_keys(keys, table, r, n)[:, g * per:(g + 1) * per].reshape(n, per * D)
            units.append(key_summaries(k.view(-1, SB, per * D), (torch.arange(width * PAGE) < n).view(-1, SB, 1)))
    centroids, kmin, kmax = (torch.stack(x) for x in zip(*units, strict=True))
    summaries = {"centroids": centroids} if score == "centroid" else {"kmin": kmin, "kmax": kmax}
    q = query.view(nd * groups, per, G, D).transpose(1, 2).reshape(nd * groups, 1, G, per * D)
    index, _ = block_select_ref(q, torch.tensor(lengths).repeat_interleave(groups), plan.k.repeat_interleave(groups),
                                plan.keep.shape[1], PAGE, unit=SB, sink_blocks=m.sink_blocks,
                                local_blocks=m.local_blocks, **summaries)
    return index.view(nd, groups, -1)


def tied_keys(keys, table, lengths):
    """Keys of exactly tied scores: all 0.25 in request 0; elsewhere 0.25 but for one sub-page of 0.5 in every
    odd page, so the odd pages tie above the even ones through the max over a page's sub-pages."""
    tied = torch.full_like(keys, 0.25)
    for r, n in enumerate(lengths[1:], start=1):
        for p in range(1, -(-n // PAGE), 2):
            sub = (p // 2) % (PAGE // SB)
            tied[table[r, p], :, sub * SB:(sub + 1) * SB] = 0.5
    return tied


@pytest.mark.parametrize("groups", [1, H])
@pytest.mark.parametrize("score", ["centroid", "bound"])
def test_tied_pages_are_the_pages_kvlab_block_route_picks(score, groups):
    """Equal scores pick equal pages in both engines: with integer queries (of positive sum) and keys of
    0.25 and 0.5, tied pages score exactly alike and every budget cuts through a tie; vLLM's selection equals
    kvlab's, which breaks ties to the lowest page."""
    lengths = [2000, 1100, 3000, 700]
    keys, table = paged_cache(lengths, seed=4)
    keys = tied_keys(keys, table, lengths)
    query = torch.randint(-3, 4, (len(lengths), H * G, D), generator=torch.Generator().manual_seed(5)).float()
    query = query * torch.where(query.sum((1, 2)) < 0, -1.0, 1.0)[:, None, None]
    m = method(budget=0.5, score=score)
    plan = plan_step(m, table, torch.tensor(lengths, dtype=torch.int32), num_decodes=len(lengths), page_size=PAGE,
                     score_block=SB, head_groups=groups)
    _, logical = select_pages(query, plan, summarise(lengths, keys, table, bounds=score == "bound"))
    kvlab = kvlab_selection(query, keys, table, lengths, plan, m, score, groups)
    for g in range(groups):
        chosen = [logical[r, g, :k].tolist() for r, k in enumerate(plan.k.tolist())]
        assert chosen == [kvlab[r, g, :k].tolist() for r, k in enumerate(plan.k.tolist())]
        if groups == 1:
            assert chosen[:3] == [[0, 1, 2, 3, 4, 5, 15], [0, 1, 3, 8], [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 23]]


def test_compacted_table_keeps_prefill_rows_and_a_covering_budget_does_not_route():
    lengths = [2000, 900]  # a decode, then a request still prefilling
    keys, table = paged_cache(lengths)
    seq = torch.tensor(lengths, dtype=torch.int32)
    plan = plan_step(method(budget=0.125), table, seq, num_decodes=1, page_size=PAGE, score_block=SB)
    assert plan is not None and plan.seq_lens[1] == 900  # the prefill row reads its whole context
    compact = compact_block_table(table, torch.zeros(1, 2, dtype=torch.int32))
    assert torch.equal(compact[1], table[1]) and compact[0, :2].tolist() == [0, 0]
    assert plan_step(method(budget=1.0), table, seq, num_decodes=1, page_size=PAGE, score_block=SB) is None
    assert plan_step(method(budget_tokens=4096), table, seq, num_decodes=1, page_size=PAGE, score_block=SB) is None
    assert plan_step(method(budget=0.125), table, seq, num_decodes=0, page_size=PAGE, score_block=SB) is None
