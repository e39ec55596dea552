"""Triton kernels against their torch references: on a CUDA GPU when there is one, else under the
Triton CPU interpreter.

Every launch gets fresh random inputs (the seed is in the failure message) and a NaN-poisoned output
buffer, so an element the kernel forgets to write fails the test. Tolerances on ‖out − ref‖/‖ref‖:
1e-5 in fp32, 1e-2 in fp16 and bf16 (bf16 operands are upcast to fp32 under the interpreter, whose
bf16 ``tl.dot`` is wrong; on a GPU bf16 runs as is).
"""

from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

from kvlab.attention import ReadPlan, attend  # noqa: E402
from kvlab.attention.reads import read_lists  # noqa: E402
from kvlab.cache.store import KVStore  # noqa: E402
from kvlab.kernels import dispatch, reference  # noqa: E402

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'kvlab[triton]'; "
                                                         "make test installs it)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(random.SystemRandom().randrange(2**31))
    return g


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> None:
    assert not torch.isnan(out).any(), f"unwritten (NaN) elements; seed {gen.initial_seed()}"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]} ({dtype}); seed {gen.initial_seed()}"


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def dev(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The inputs on the device the kernels run on (drawn on the CPU, from the test's generator)."""
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def random_lists(gen: torch.Generator, rows: int, max_tokens: int, block_size: int, extra_blocks: int = 3
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shuffled physical blocks, random per-row lengths: ``(table [rows, n], seq_lens [rows], pool slots)``."""
    n = -(-max_tokens // block_size)
    pool_blocks = rows * n + extra_blocks
    perm = torch.randperm(pool_blocks, generator=gen)[: rows * n].view(rows, n)
    lens = torch.randint(1, max_tokens + 1, (rows,), generator=gen)
    used = -(-lens // block_size)
    table = torch.where(torch.arange(n)[None, :] < used[:, None], perm, torch.full_like(perm, -1))
    return table.int(), lens.int(), pool_blocks * block_size


# ------------------------------------------------------------ paged decode attention
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_attention(gen: torch.Generator, dtype: torch.dtype, block_size: int, num_splits: int) -> None:
    from kvlab.kernels.paged_attention import paged_decode_attention

    b, h, groups, d = 2, 2, 4, 64
    table, lens, slots = random_lists(gen, b * h, 200, block_size)
    k = torch.randn(slots, d, generator=gen).to(dtype)
    v = torch.randn(slots, d, generator=gen).to(dtype)
    q = torch.randn(b, h, groups, d, generator=gen).to(dtype)
    q, k, v, table, lens = dev(q, k, v, table, lens)
    out = paged_decode_attention(q, k, v, table, lens, block_size, d**-0.5, num_splits=num_splits,
                                 out=poisoned(q.shape, dtype))
    ref = reference.paged_decode_attention_ref(q, k, v, table, lens, block_size, d**-0.5)
    check_close(out, ref, dtype, gen)


@needs_triton
def test_paged_kernel_launch_config_is_scoped(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuned launch configuration (what `kvlab bench gpu --tune` returns) acts inside `tuned` only, or for
    one call with `config=`; the module's defaults never change."""
    from kvlab.kernels import paged_attention as pa

    b, h, groups, d = 1, 2, 2, 32
    table, lens, slots = random_lists(gen, b * h, 300, 16)
    k, v, q = (torch.randn(n, d, generator=gen) for n in (slots, slots, b * h * groups))
    q, k, v, table, lens = dev(q.view(b, h, groups, d), k, v, table, lens)
    ref = reference.paged_decode_attention_ref(q, k, v, table, lens, 16, d**-0.5)
    defaults = dict(pa.TUNING)
    seen = []
    split_plan = pa.split_plan
    monkeypatch.setattr(pa, "split_plan", lambda *args: (seen.append(args[-1]), split_plan(*args))[1])  # tile width
    with pa.tuned({"BLOCK_N": 32, "num_warps": 2}):
        check_close(pa.paged_decode_attention(q, k, v, table, lens, 16, d**-0.5), ref, torch.float32, gen)
    check_close(pa.paged_decode_attention(q, k, v, table, lens, 16, d**-0.5), ref, torch.float32, gen)
    out = pa.paged_decode_attention(q, k, v, table, lens, 16, d**-0.5, config={**defaults, "BLOCK_N": 128})
    check_close(out, ref, torch.float32, gen)
    assert seen == [32, defaults["BLOCK_N"], 128]
    assert pa.TUNING == defaults


@needs_triton
@pytest.mark.parametrize("window", [None, 40])
def test_paged_decode_attention_positions(gen: torch.Generator, window: int | None) -> None:
    """Several query tokens per group (M = G * L), causal and sliding-window masks from slot positions."""
    from kvlab.kernels.paged_attention import paged_decode_attention

    b, h, groups, length, d, bs = 2, 2, 2, 3, 32, 4
    table, lens, slots = random_lists(gen, b * h, 150, bs)
    k = torch.randn(slots, d, generator=gen)
    v = torch.randn(slots, d, generator=gen)
    kv_pos = torch.randint(-1, 160, (slots,), generator=gen)  # -1: empty slots
    q_pos = torch.randint(60, 160, (b, length), generator=gen)
    q = torch.randn(b, h, groups * length, d, generator=gen)
    q, k, v, table, lens, kv_pos, q_pos = dev(q, k, v, table, lens, kv_pos, q_pos)
    out = paged_decode_attention(q, k, v, table, lens, bs, d**-0.5, q_pos, kv_pos, window, num_splits=2,
                                 out=poisoned(q.shape, torch.float32))
    ref = reference.paged_decode_attention_ref(q, k, v, table, lens, bs, d**-0.5, q_pos, kv_pos, window)
    check_close(out, ref, torch.float32, gen)


@needs_triton
def test_paged_decode_attention_empty_rows(gen: torch.Generator) -> None:
    """Rows with nothing to read give zeros (and the merge of all-empty splits writes them)."""
    from kvlab.kernels.paged_attention import paged_decode_attention

    d = 32
    table, lens, slots = random_lists(gen, 4, 130, 16)
    lens[1] = 0
    k, v = torch.randn(slots, d, generator=gen), torch.randn(slots, d, generator=gen)
    q = torch.randn(2, 2, 4, d, generator=gen)
    q, k, v, table, lens = dev(q, k, v, table, lens)
    for splits in (1, 3):
        out = paged_decode_attention(q, k, v, table, lens, 16, d**-0.5, num_splits=splits,
                                     out=poisoned(q.shape, torch.float32))
        assert torch.equal(out[0, 1].cpu(), torch.zeros(4, d))
        check_close(out, reference.paged_decode_attention_ref(q, k, v, table, lens, 16, d**-0.5), torch.float32, gen)


# ------------------------------------------------------------ block scoring
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quest", [False, True])
def test_block_scores(gen: torch.Generator, dtype: torch.dtype, quest: bool) -> None:
    from kvlab.kernels.block_scoring import block_scores

    b, h, groups, d, num_blocks, n = 2, 2, 4, 64, 90, 70
    q = torch.randn(b, h, groups, d, generator=gen).to(dtype)
    table = torch.randint(0, num_blocks, (b * h, n), generator=gen).int()
    counts = torch.randint(0, n + 1, (b * h,), generator=gen).int()
    counts[0] = n
    lo = torch.randn(num_blocks, d, generator=gen).to(dtype)
    hi = (lo.float() + torch.rand(num_blocks, d, generator=gen)).to(dtype)
    cent = torch.randn(num_blocks, d, generator=gen).to(dtype)
    q, table, counts, lo, hi, cent = dev(q, table, counts, lo, hi, cent)
    kw = dict(kmin=lo, kmax=hi) if quest else dict(centroids=cent)
    out = block_scores(q, table, counts, out=poisoned((b * h, n), torch.float32), **kw)
    ref = reference.block_scores_ref(q, table, counts, **kw)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), f"padding differs; seed {gen.initial_seed()}"
    check_close(out[finite], ref[finite], torch.float32, gen)  # fp32 accumulation whatever the input dtype


def test_quest_bound_is_an_upper_bound(gen: torch.Generator) -> None:
    """The Quest score of a block is at least the group's summed q·k for any key in the block."""
    d, bs = 16, 8
    keys = torch.randn(4 * bs, d, generator=gen)
    lo, hi = keys.view(4, bs, d).amin(1), keys.view(4, bs, d).amax(1)
    q = torch.randn(1, 1, 3, d, generator=gen)
    scores = reference.block_scores_ref(q, torch.arange(4)[None].int(), torch.tensor([4]), kmin=lo, kmax=hi)
    exact = (q[0, 0] @ keys.T).sum(0).view(4, bs).amax(-1)
    assert (scores[0] >= exact - 1e-5).all()


def test_top_k_blocks() -> None:
    scores = torch.tensor([[0.1, 5.0, 3.0, float("-inf")], [2.0, float("-inf"), float("-inf"), float("-inf")]])
    table = torch.tensor([[7, 3, 9, -1], [4, -1, -1, -1]])
    chosen, counts = dispatch.top_k_blocks(scores, table, 2)
    assert chosen.tolist() == [[3, 9], [4, -1]]
    assert counts.tolist() == [2, 1]


# ------------------------------------------------------------ low-rank attention
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_mode", ["full", "lowrank", "lowrank-rope"])
def test_lowrank_decode_attention(gen: torch.Generator, dtype: torch.dtype, k_mode: str) -> None:
    from kvlab.kernels.lowrank_attention import lowrank_decode_attention

    b, h, groups, d, bs, rk, rv = 2, 2, 4, 32, 4, 12, 20
    table, lens, slots = random_lists(gen, b * h, 120, bs)
    q = torch.randn(b, h, groups, d, generator=gen).to(dtype)
    k_cache = torch.randn(slots, d if k_mode == "full" else rk, generator=gen).to(dtype)
    k_basis = None if k_mode == "full" else (torch.randn(h, rk, d, generator=gen) / rk**0.5).to(dtype)
    v_latent = torch.randn(slots, rv, generator=gen).to(dtype)
    v_basis = (torch.randn(h, rv, d, generator=gen) / rv**0.5).to(dtype)
    pos = torch.randint(0, 4000, (slots,), generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d) if k_mode == "lowrank-rope" else None
    q, table, lens, k_cache, k_basis, v_latent, v_basis, pos, inv_freq = dev(
        q, table, lens, k_cache, k_basis, v_latent, v_basis, pos, inv_freq)
    for splits in (1, 2):
        out = lowrank_decode_attention(q, k_cache, v_latent, v_basis, table, lens, bs, d**-0.5, k_basis, pos, inv_freq,
                                       num_splits=splits, out=poisoned(q.shape, dtype))
        ref = reference.lowrank_decode_attention_ref(q, k_cache, v_latent, v_basis, table, lens, bs, d**-0.5,
                                                     k_basis, pos, inv_freq)
        check_close(out, ref, dtype, gen)


def test_lowrank_reference_matches_expanded_cache(gen: torch.Generator) -> None:
    """The low-rank reference equals plain attention over the expanded (and rotated) cache."""
    b, h, groups, d, bs, rk, rv = 1, 2, 2, 16, 4, 4, 6
    table, lens, slots = random_lists(gen, b * h, 40, bs)
    q = torch.randn(b, h, groups, d, generator=gen)
    a_k, k_basis = torch.randn(slots, rk, generator=gen), torch.randn(h, rk, d, generator=gen)
    a_v, v_basis = torch.randn(slots, rv, generator=gen), torch.randn(h, rv, d, generator=gen)
    pos = torch.randint(0, 100, (slots,), generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    out = reference.lowrank_decode_attention_ref(q, a_k, a_v, v_basis, table, lens, bs, 0.25, k_basis, pos, inv_freq)
    for row in range(h):  # expand row by row: slots belong to one head's basis
        k_full = reference.rope_rotate(a_k @ k_basis[row], pos, inv_freq)
        v_full = a_v @ v_basis[row]
        ref = reference.paged_decode_attention_ref(q[:, row:row + 1], k_full, v_full, table[row:row + 1],
                                                   lens[row:row + 1], bs, 0.25)
        assert rel_err(out[:, row:row + 1], ref) < 1e-5


# ------------------------------------------------------------ the dispatcher over the store
def make_layer(gen: torch.Generator, dtype: torch.dtype, block_size: int, tokens: int = 90, window: int | None = None,
               evict: bool = False, device: str | torch.device = "cpu"):
    b, h, d, device = 2, 2, 32, torch.device(device)
    store = KVStore.empty(1, b, h, d, block_size=block_size, dtype=dtype,
                          sliding_windows=[window], device=device)
    layer = store.layers[0]
    keys = torch.randn(b, h, tokens, d, generator=gen).to(device)
    values = torch.randn(b, h, tokens, d, generator=gen).to(device)
    layer.append(keys, values, torch.arange(tokens, device=device)[None].expand(b, tokens))
    if evict:  # rows keep different numbers of tokens (and the layout stops being uniform)
        keep = torch.rand(layer.rows, tokens, generator=gen) < torch.rand(layer.rows, 1, generator=gen)
        keep[:, -1] = True
        layer.repack(keep=keep.to(device), reserve_tokens=3)
    return layer


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["full", "evicted", "holes", "blocks", "blocks-4", "blocks-32", "tokens", "chunk",
                                  "window"])
def test_attend_triton_matches_torch(gen: torch.Generator, dtype: torch.dtype, case: str) -> None:
    """``kvlab.attention.attend`` through Triton equals its torch path for every kind of read."""
    bs = 8
    layer = make_layer(gen, dtype, bs, window=24 if case == "window" else None, evict=case == "evicted",
                       device=DEVICE)
    if case == "holes":  # decode-time eviction marks slots dead (position -1) before compacting them
        from kvlab.methods._scoring import mark_dead

        for _ in range(5):
            mark_dead(layer, torch.randint(0, 80, (layer.rows,), generator=gen).to(DEVICE),
                      torch.ones(layer.rows, dtype=torch.bool, device=DEVICE))
        layer.holes = True
    b, h, groups, d = layer.batch, layer.kv_heads, 4, layer.head_dim
    length = 3 if case == "chunk" else 1
    tokens = int(layer.lengths.max())
    newest = int(layer.positions.max())
    q_pos = torch.arange(newest + 1 - length, newest + 1)[None].expand(b, length) if case == "chunk" \
        else torch.full((b, 1), newest + 1)
    query = torch.randn(b, h * groups, length, d, generator=gen).to(dtype)
    plan = None
    if case.startswith("blocks"):  # blocks of the store's size, or finer / coarser logical blocks
        plan_bs = int(case.split("-")[1]) if "-" in case else None
        n_blocks = -(-tokens // (plan_bs or bs))
        index = torch.stack([torch.randperm(n_blocks, generator=gen)[:3].sort().values for _ in range(b * h)])
        index[0, -1:] = -1
        plan = ReadPlan("blocks", index.view(b, h, 3), block_size=plan_bs)
    elif case == "tokens":
        index = torch.stack([torch.randperm(tokens, generator=gen)[:23].sort().values for _ in range(b * h)])
        index[1, -4:] = -1
        plan = ReadPlan("tokens", index.view(b, h, 23))
    query, q_pos = dev(query, q_pos)
    if plan is not None:
        plan = ReadPlan(plan.kind, plan.index.to(DEVICE), block_size=plan.block_size)
    out = attend(layer, query, q_pos, d**-0.5, plan, backend="triton")
    ref = attend(layer, query, q_pos, d**-0.5, plan, backend="torch")
    assert out.shape == ref.shape == (b, length, h * groups, d)
    check_close(out, ref, dtype, gen)


def test_dispatch_uses_torch_on_cpu(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dispatch.use_triton(torch.device("cpu"))
    assert not dispatch.use_triton(torch.device("cpu"), "torch")
    monkeypatch.setenv("KVLAB_KERNELS", "torch")
    assert not dispatch.use_triton(torch.device("cuda"))
    layer = make_layer(gen, torch.float32, 4)
    query = torch.randn(2, 8, 1, 32, generator=gen)
    q_pos = torch.full((2, 1), 90)
    assert torch.equal(attend(layer, query, q_pos, 0.2), attend(layer, query, q_pos, 0.2, backend="torch"))
    q = torch.randn(2, 2, 4, 32, generator=gen)
    lists = read_lists(layer)
    args = (q, layer.keys, layer.values, lists.table, lists.seq_lens, lists.block_size, 0.2)
    out = dispatch.paged_decode_attention(*args, row_offsets=lists.row_offsets)
    assert torch.equal(out, reference.paged_decode_attention_ref(*args, row_offsets=lists.row_offsets))



def test_full_lists_are_the_layers_own_table(gen: torch.Generator) -> None:
    """A full read lists every block of each row from the layer's cached table: the same tensors every step of a
    layout, a new table when the layout changes (growth, a clone), nothing hung on the layer from outside."""
    layer = make_layer(gen, torch.float32, 8, tokens=20)
    lists = read_lists(layer)
    assert lists.table.shape == (layer.rows, layer.capacity_host[0]) and lists.table.dtype == torch.int32
    assert lists.table[0].tolist() == list(range(layer.capacity_host[0]))
    assert lists.seq_lens is layer.lengths and lists.row_offsets is layer.row_base
    assert read_lists(layer).table is lists.table
    assert not any(name.startswith("_full_lists") for name in vars(layer))
    layer.reserve(40)  # grows: a new layout, a wider table
    grown = read_lists(layer)
    assert grown.table is not lists.table and grown.table.shape[1] == layer.capacity_host[0] > lists.table.shape[1]
    copy = layer.clone()
    assert read_lists(copy).table is not grown.table and torch.equal(read_lists(copy).table, grown.table)

# ------------------------------------------------------------ the GPU benchmark, without a GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_gpu_without_cuda_is_one_clear_error() -> None:
    from typer.testing import CliRunner

    from kvlab.cli import app
    from kvlab.errors import KVLabError
    from kvlab.experiments.bench_gpu import run_gpu_benchmark

    with pytest.raises(KVLabError, match="needs a CUDA GPU"):
        run_gpu_benchmark(out_dir=None)
    result = CliRunner().invoke(app, ["bench", "gpu", "--quick"])
    assert isinstance(result.exception, KVLabError)


def test_bench_gpu_targets_from_rows() -> None:
    from kvlab.experiments.bench_gpu_kernels import evaluate_targets

    rows = [
        {"context": 131072, "batch": 1, "variant": "torch sdpa", "part": "attention", "us": 100.0, "GBps": 2000.0},
        {"context": 131072, "batch": 1, "variant": "kvlab full (bs=16)", "part": "attention", "us": 105.0,
         "GBps": 1900.0},
        {"context": 131072, "batch": 1, "variant": "kvlab block-route 1/8 (bs=16)", "part": "attention", "us": 15.0,
         "GBps": 1700.0},
    ]
    targets = {t["target"]: t["met"] for t in evaluate_targets(rows, copy_gbps=2400.0)}
    assert targets["kvlab full within 10% of the best library kernel (eager)"] is True
    assert targets["block-route 1/8 ≥ 6× faster than full at 128K (attention; eager)"] is True
    assert targets["block-route bandwidth on selected bytes ≥ 70% of copy bandwidth (eager)"] is True
    for r in rows:  # the CUDA-graph times judge the same targets separately
        r["us_graph"], r["GBps_graph"] = r["us"] * 2, r["GBps"] / 2
    graph = {t["target"]: t["met"] for t in evaluate_targets(rows, copy_gbps=2400.0, timing="us_graph")}
    assert graph["block-route bandwidth on selected bytes ≥ 70% of copy bandwidth (CUDA graph)"] is False
    assert graph["kvlab full within 10% of the best library kernel (CUDA graph)"] is True


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score,block_size,unit", [("centroid", 16, 16), ("bound", 16, 16), ("centroid", 16, 4),
                                                   ("bound", 8, 2), ("centroid", 4, 4)])
def test_block_select_matches_reference(gen: torch.Generator, dtype: torch.dtype, score: str, block_size: int,
                                        unit: int) -> None:
    """The fused scoring + top-k kernel picks exactly the reference's blocks (ascending, -1 padded) and
    counts the tokens they cover, for rows of random lengths, a sink and newest blocks, sub-block units."""
    from kvlab.kernels.block_scoring import block_select

    b, h, groups, d, capacity = 2, 3, 4, 32, 400
    rows, n_units = b * h, -(-capacity // unit)
    lengths = torch.randint(1, capacity + 1, (rows,), generator=gen)
    lengths[0] = capacity
    nb = -(-lengths // block_size)
    k = (nb.float() * torch.rand(rows, generator=gen)).long().clamp(min=3)
    width = int(-(-capacity // block_size) * 0.8)
    q = torch.randn(b, h, groups, d, generator=gen).to(dtype)
    lo = torch.randn(rows, n_units, d, generator=gen).to(dtype)
    kw = dict(kmin=lo, kmax=(lo.float() + torch.rand(rows, n_units, d, generator=gen)).to(dtype)) \
        if score == "bound" else dict(centroids=torch.randn(rows, n_units, d, generator=gen).to(dtype))
    q, lengths, k = dev(q, lengths, k)
    kw = {name: t.to(DEVICE) for name, t in kw.items()}
    table, tokens = block_select(q, lengths, k, width, block_size, unit=unit, sink_blocks=1, local_blocks=2, **kw)
    ref_table, ref_tokens = reference.block_select_ref(q, lengths, k, width, block_size, unit=unit, sink_blocks=1,
                                                       local_blocks=2, **kw)
    assert torch.equal(table.long().cpu(), ref_table.cpu()), f"seed {gen.initial_seed()}"
    assert torch.equal(tokens.long().cpu(), ref_tokens.long().cpu()), f"seed {gen.initial_seed()}"
    chosen = ref_table.cpu()
    for row in range(rows):  # the sink block and the newest two are always read; k blocks in all
        sel = chosen[row][chosen[row] >= 0].tolist()
        n = int(nb[row])
        assert {0, n - 1, max(n - 2, 0)} <= set(sel) and len(sel) == min(int(k[row]), n, width)


@needs_triton
def test_block_route_decodes_through_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole decode of block-route with every kernel in Triton (the interpreter here) equals its torch path."""
    import kvlab
    from kvlab.generation import decode, prefill
    from kvlab.methods import make_method

    model, _ = kvlab.load("random:tiny-llama")
    model = model.to(DEVICE)
    snap = prefill(model, [list(range(3, 203)), list(range(9, 150))], block_size=8, reserve_tokens=4)
    method = dict(budget=0.3, block_size=8, dense_layers=0)
    monkeypatch.setenv("KVLAB_KERNELS", "torch")
    ref = decode(model, snap, make_method("block-route", **method), 4, return_logits=True)
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    out = decode(model, snap, make_method("block-route", **method), 4, return_logits=True, cuda_graphs=False)
    assert torch.equal(out.tokens, ref.tokens)
    assert (out.logits - ref.logits).abs().max() <= 1e-4



# ------------------------------------------------------------ the low-rank method on its kernel
LOW_RANK_MODES = [("v-only", "pre-rope"), ("kv", "post-rope"), ("kv", "pre-rope")]


@pytest.fixture(scope="module")
def tiny_llama():
    import kvlab

    return kvlab.load("random:tiny-llama")[0].to(DEVICE)  # head_dim 16, 2 KV heads, GQA 2


def count_lowrank_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every launch of the low-rank Triton kernel (one entry per launch); on the CPU, under the
    interpreter."""
    from kvlab.kernels import lowrank_attention

    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    launches: list[int] = []
    kernel = lowrank_attention.lowrank_decode_attention
    monkeypatch.setattr(lowrank_attention, "lowrank_decode_attention",
                        lambda *args, **kwargs: (launches.append(1), kernel(*args, **kwargs))[1])
    return launches


def low_rank_layer(gen: torch.Generator, model, mode: str, keys: str, ragged: bool):
    """A low-rank layer (rank 6 keys, 5 values) over random post-RoPE K/V at positions 0..31: 2 sequences,
    2 KV heads, D = 16, blocks of 4; ``ragged``: rows keep different numbers of tokens (each its own capacity)."""
    from kvlab.methods._lowrank_store import Rope
    from kvlab.methods.low_rank import LowRankLayerStore, random_orthogonal

    b, h, d, tokens = 2, 2, 16, 32
    layer = KVStore.empty(1, b, h, d, block_size=4, device=DEVICE).layers[0]
    layer.append(*dev(torch.randn(b, h, tokens, d, generator=gen), torch.randn(b, h, tokens, d, generator=gen),
                      torch.arange(tokens)[None].expand(b, tokens)))
    if ragged:
        keep = torch.rand(layer.rows, tokens, generator=gen) < torch.tensor([[0.9], [0.3], [0.6], [1.0]])
        keep[:, -1] = True
        layer.repack(keep=keep.to(DEVICE), capacity_blocks=[8, 6, 8, 9])
    pk = torch.stack([random_orthogonal(d, 6, gen) for _ in range(h)]) if mode == "kv" else None
    pv = torch.stack([random_orthogonal(d, 5, gen) for _ in range(h)])
    rope = Rope(model, 0) if mode == "kv" and keys == "pre-rope" else None
    return LowRankLayerStore(layer, pk, pv, rope)


@needs_triton
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("mode,keys", LOW_RANK_MODES)
def test_low_rank_attention_on_its_kernel(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, tiny_llama,
                                          mode: str, keys: str, ragged: bool) -> None:
    """A low-rank layer's decode attention through the Triton kernel equals its torch path, in every mode, and
    again after appends past every row's capacity (a new layout: new row starts, a wider table)."""
    layer = low_rank_layer(gen, tiny_llama, mode, keys, ragged)
    assert layer.uniform != ragged
    launches = count_lowrank_launches(monkeypatch)
    for step in range(2):
        if step:
            new_kv = torch.randn(2, 2, 12, 16, generator=gen)
            layer.append(*dev(new_kv, new_kv, torch.arange(32, 44)[None].expand(2, 12)))
        query, q_pos = dev(torch.randn(2, 4, 1, 16, generator=gen), torch.full((2, 1), 32 + 12 * step))
        out = layer.attend_override(query, q_pos, 0.25, None, backend="triton")
        ref = layer.attend_override(query, q_pos, 0.25, None, backend="torch")
        assert len(launches) == step + 1 and out.shape == ref.shape == (2, 1, 4, 16)
        assert rel_err(out, ref) < 1e-4, f"step {step}; seed {gen.initial_seed()}"


@needs_triton
def test_low_rank_kernel_only_where_it_is_exact(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                tiny_llama) -> None:
    """Several query tokens, a read plan or dead slots take the torch path even with the Triton backend."""
    layer = low_rank_layer(gen, tiny_llama, "kv", "pre-rope", False)
    launches = count_lowrank_launches(monkeypatch)
    chunk = dev(torch.randn(2, 4, 3, 16, generator=gen), torch.tensor([[29, 30, 31]] * 2))
    plan = ReadPlan("blocks", torch.tensor([[[0, 2], [1, -1]]] * 2, device=DEVICE))
    single = dev(torch.randn(2, 4, 1, 16, generator=gen), torch.full((2, 1), 32))
    for (query, q_pos), p in ((chunk, None), (single, plan)):
        torch.testing.assert_close(layer.attend_override(query, q_pos, 0.25, p, backend="triton"),
                                   layer.attend_override(query, q_pos, 0.25, p, backend="torch"))
    layer.holes = True
    assert not layer.kernel_reads(single[0])
    assert launches == []


@needs_triton
def test_low_rank_kernel_path_reads_nothing_back(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                 tiny_llama) -> None:
    """Choosing the kernel, building its lists and launching it force no device sync (the launch itself is
    stubbed: the interpreter copies to numpy, a GPU launch does not)."""
    from kvlab.experiments.bench_decode import SyncCounter
    from kvlab.kernels import lowrank_attention

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    launched: list[tuple[int, int]] = []
    monkeypatch.setattr(lowrank_attention, "_lowrank_split_kernel", Launch())
    layer = low_rank_layer(gen, tiny_llama, "kv", "pre-rope", True)
    query, q_pos = dev(torch.randn(2, 4, 1, 16, generator=gen), torch.full((2, 1), 32))
    count_lowrank_launches(monkeypatch)
    with SyncCounter() as counter:
        layer.attend_override(query, q_pos, 0.25, None, backend="triton")
    assert launched == [(4, 1)] and counter.counts == {}

@needs_triton
@pytest.mark.parametrize("mode,keys", LOW_RANK_MODES)
def test_low_rank_decodes_through_its_kernel(monkeypatch: pytest.MonkeyPatch, tiny_llama, mode: str,
                                             keys: str) -> None:
    """A whole decode of low-rank with every kernel in Triton (the interpreter here) gives the tokens of its
    torch path."""
    from kvlab.generation import decode, prefill
    from kvlab.methods import make_method

    snap = prefill(tiny_llama, [list(range(3, 60)), list(range(9, 40))], block_size=8, reserve_tokens=2)
    method = dict(rank=6, mode=mode, keys=keys)
    monkeypatch.setenv("KVLAB_KERNELS", "torch")
    ref = decode(tiny_llama, snap, make_method("low-rank", **method), 6, return_logits=True)
    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    launches = count_lowrank_launches(monkeypatch)
    out = decode(tiny_llama, snap, make_method("low-rank", **method), 6, return_logits=True, cuda_graphs=False)
    assert len(launches) == 2 * 5  # every layer, every step after the first token
    assert torch.equal(out.tokens, ref.tokens)
    assert (out.logits - ref.logits).abs().max() <= 1e-4

@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu() -> None:
    """bf16 kernels lower to sm_90 cubins (Triton's CUDA backend + its bundled ptxas; no GPU needed).

    The interpreter cannot run bf16 ``tl.dot``; this at least proves the GPU build of every kernel.
    Runs in a subprocess because the interpreter patches ``triton.language`` in this one.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "kvlab.kernels.aot_check", "90", "bf16"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok   sm_90") == 8, proc.stdout


def test_bench_gpu_docs_section_replaces_only_its_own(tmp_path) -> None:
    from kvlab.experiments.gpu_report import update_docs

    rows = [{"context": 8192, "batch": 1, "variant": "torch sdpa", "part": "attention", "us": 50.0},
            {"context": 8192, "batch": 1, "variant": "kvlab full (bs=16)", "part": "attention", "us": 52.0}]
    result = {"device": "Test GPU", "date": "2026-01-01", "versions": {"torch": "t", "triton": "x"},
              "device_rates": {"copy_GBps": 3000.0, "matmul_TFLOPs": 700.0}, "attention": rows, "targets": [],
              "e2e": [{"context": 32768, "batch": 1, "variant": "kvlab full", "tokens_per_s": 40.0, "ms_per_step": 25.0,
                       "roofline_ms": 20.0, "of_roofline": 1.25}]}
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## CPU\n\nkeep\n\n## GPU kernels\n\nno GPU yet\n\n## Later\n\nkeep too\n")
    update_docs(result, path)
    text = path.read_text()
    assert "no GPU yet" not in text and "keep\n" in text and "\n\n## Later\n\nkeep too" in text
    assert "| 8K | 1 | 50.0 | 52.0 |" in text and "Test GPU" in text and "| 32K × 1 | kvlab full | 40.0 | 25.00" in text


def test_bench_gpu_end_to_end_runs_on_cpu() -> None:
    """The end-to-end part of the GPU benchmark (kvlab decode of a filled store, steady-state step time from
    two decodes) on a tiny random model on the CPU (no timing claims, no peer: that needs CUDA)."""
    from kvlab.experiments.bench_gpu_e2e import e2e_rows, e2e_targets

    rows = e2e_rows(((512, 2),), torch.device("cpu"), steps=2, log=lambda line: None, copy_gbps=10.0,
                    model_name="random:tiny-llama", peer=False)
    by_name = {r["variant"]: r for r in rows}
    for name in ("kvlab full", "kvlab block-route 1/8"):
        row = by_name[name]
        assert "tokens_per_s" in row and row["batch"] == 2 and row["roofline_ms"] > 0, row
    assert by_name["kvlab block-route 1/8"]["bytes_per_step"] < by_name["kvlab full"]["bytes_per_step"]
    assert e2e_targets(rows) == []  # the goals are stated at 128K only
