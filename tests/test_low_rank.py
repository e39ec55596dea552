"""low-rank: exactness at full rank, pre-RoPE keys, compressed-space attention, PCA calibration, bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

import kvlab
from kvlab.attention.torch_attention import attend_dense
from kvlab.cache.store import LayerStore
from kvlab.cli import app
from kvlab.errors import KVLabError
from kvlab.experiments.calibrate import calibrate, collect, fit
from kvlab.generation import decode, prefill
from kvlab.kernels import dispatch as kernel_dispatch
from kvlab.methods import low_rank, make_method
from kvlab.methods._lowrank_store import Rope
from kvlab.methods.low_rank import LowRankLayerStore, random_orthogonal

PROMPT = [[(5 * i) % 250 + 1 for i in range(90)]]


@pytest.fixture(scope="module")
def tiny():
    model, tok = kvlab.load("random:tiny-llama")  # head_dim 16, 2 KV heads, 4 query heads
    return model, tok, prefill(model, PROMPT, reserve_tokens=16)


@pytest.mark.parametrize("mode,keys", [("v-only", "pre-rope"), ("kv", "pre-rope"), ("kv", "post-rope")])
def test_orthogonal_full_rank_reproduces_full(tiny, mode: str, keys: str) -> None:
    model, _, snap = tiny
    full = decode(model, snap, make_method("full"), 6, return_logits=True)
    res = decode(model, snap, make_method("low-rank", rank=16, mode=mode, keys=keys, allow_full_rank=True), 6,
                 return_logits=True)
    assert float((res.logits - full.logits).abs().max()) <= 1e-4
    assert torch.equal(res.tokens, full.tokens)


def test_pre_rope_keys_equal_k_proj_output(tiny) -> None:
    model, _, _ = tiny
    captured = {}
    attn = model.model.layers[1].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o.detach().clone()))
    try:
        snap = prefill(model, PROMPT)
    finally:
        handle.remove()
    k_post, _, pos = snap.store.layers[1].dense_view()
    pre = Rope(model, 1).unrotate(k_post[0], pos[0])  # [H, T, D]
    k_proj = captured["k"][0].view(-1, 2, 16).transpose(0, 1)
    assert torch.allclose(pre, k_proj, atol=1e-5)
    assert torch.allclose(Rope(model, 1).rotate(pre, pos[0]), k_post[0], atol=1e-5)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_compressed_space_attention_equals_decoded(tiny, pre_rope: bool) -> None:
    model, _, snap = tiny
    src = snap.store.layers[0]
    g = torch.Generator().manual_seed(1)
    pk = torch.stack([random_orthogonal(16, 6, g) for _ in range(2)])
    pv = torch.stack([random_orthogonal(16, 5, g) for _ in range(2)])
    lr = LowRankLayerStore(src, pk, pv, Rope(model, 0) if pre_rope else None)
    # the reference: a plain layer holding the decoded (reconstructed) K/V
    ref = LayerStore(1, 2, 16, 16, torch.float32, torch.device("cpu"))
    k, v, p = lr.dense_view()
    ref.append(k, v, p[:, 0])
    q = torch.randn(1, 4, 3, 16, generator=g)
    qpos = torch.tensor([[88, 89, 89]])
    out = lr.attend_override(q, qpos, 0.25, None)
    assert torch.allclose(out, attend_dense(ref, q, qpos, 0.25), atol=1e-5)
    # and the latents really are rank 6 / 5 per token
    assert lr.k_codes.shape[1] == 6 and lr.v_codes.shape[1] == 5


def test_torch_backend_never_touches_triton(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """``backend="torch"`` computes on the latents in torch even where the kernel applies (a decode step) and
    the environment asks for Triton: no triton import, no availability check, no launch."""
    model, _, snap = tiny
    g = torch.Generator().manual_seed(2)
    pk = torch.stack([random_orthogonal(16, 6, g) for _ in range(2)])
    pv = torch.stack([random_orthogonal(16, 5, g) for _ in range(2)])
    lr = LowRankLayerStore(snap.store.layers[0], pk, pv, Rope(model, 0))
    q, qpos = torch.randn(1, 4, 1, 16, generator=g), torch.tensor([[90]])
    expected = lr.attend_override(q, qpos, 0.25, None, backend="torch")

    def forbidden(*args, **kwargs):
        raise AssertionError("the torch backend reached triton")

    monkeypatch.setenv("KVLAB_KERNELS", "triton")
    for name in ("triton", "kvlab.kernels.lowrank_attention", "kvlab.kernels.paged_attention"):
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now fails
    monkeypatch.setattr(kernel_dispatch, "triton_available", forbidden)
    monkeypatch.setattr(low_rank, "lowrank_decode_attention", forbidden)
    assert lr.kernel_reads(q)
    assert torch.equal(lr.attend_override(q, qpos, 0.25, None, backend="torch"), expected)


def test_latent_bytes(tiny) -> None:
    model, _, snap = tiny
    res = decode(model, snap, make_method("low-rank", rank=4, mode="kv"), 2)
    v_only = decode(model, snap, make_method("low-rank", rank=4, mode="v-only"), 2)
    full = decode(model, snap, make_method("full"), 2)
    assert res.bytes_after_prefill * 4 == full.bytes_after_prefill  # 4 + 4 numbers instead of 16 + 16
    assert v_only.bytes_after_prefill * 32 == full.bytes_after_prefill * 20  # 16 + 4 instead of 32


def test_pca_calibration(tiny, tmp_path) -> None:
    model, tok, snap = tiny
    data = collect(model, PROMPT[0])
    vecs, vals = fit(data["v"][0])
    x = data["v"][0]  # [H, T, D]
    full_rec = x @ vecs @ vecs.transpose(1, 2)
    assert float(full_rec.pow(2).sum() / x.pow(2).sum()) >= 0.99
    top = vecs[..., :4]
    kept = float((x @ top).pow(2).sum() / x.pow(2).sum())
    assert kept == pytest.approx(float((vals[:, :4].sum(-1) / vals.sum(-1) * x.pow(2).sum((1, 2))).sum()
                                       / x.pow(2).sum()), rel=1e-3)
    paths, stats = calibrate("random:tiny-llama", [4, 16], tokens=64, folder=tmp_path, model=model, tokenizer=tok)
    assert all(p.is_file() for p in paths)
    assert stats["energy"]["v"][16] >= 0.99 and stats["energy"]["k_pre"][16] >= 0.99
    assert 4 / 16 <= stats["energy"]["v"][4] < stats["energy"]["v"][16]  # PCA beats a random 4-dim subspace
    full = decode(model, snap, make_method("full"), 4, return_logits=True)
    res = decode(model, snap, make_method("low-rank", rank=16, mode="kv", projection="pca", calibration=str(paths[1]),
                                          allow_full_rank=True), 4, return_logits=True)
    assert float((res.logits - full.logits).abs().max()) <= 1e-4
    decode(model, snap, make_method("low-rank", rank=4, mode="kv", projection="pca", calibration=str(paths[0])), 3)


def test_bad_input(tiny, tmp_path) -> None:
    model, _, snap = tiny
    with pytest.raises(KVLabError, match="rank must be a positive"):
        make_method("low-rank", rank=0)
    with pytest.raises(KVLabError, match="below head_dim"):
        decode(model, snap, make_method("low-rank", rank=16), 2)
    with pytest.raises(KVLabError, match="below head_dim"):
        decode(model, snap, make_method("low-rank", rank=40), 2)
    with pytest.raises(KVLabError, match="mode must be"):
        make_method("low-rank", mode="k-only")
    with pytest.raises(KVLabError, match="kvlab calibrate --model"):
        decode(model, snap, make_method("low-rank", rank=4, projection="pca",
                                        calibration=str(tmp_path / "none.pt")), 2)
    with pytest.raises(KVLabError, match="leave budget"):
        make_method("low-rank", budget=0.5)


def test_cli_generate_low_rank() -> None:
    res = CliRunner().invoke(app, ["generate", "--model", "random:tiny-llama", "--method", "low-rank", "--rank", "8",
                                   "--mode", "v-only", "--prompt", "some prompt text here", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("shape", ["tiny-qwen2", "tiny-gemma3"])
def test_full_rank_batch_and_architectures(shape: str) -> None:
    model, _ = kvlab.load(f"random:{shape}")
    snap = prefill(model, [[(3 * i) % 250 + 1 for i in range(50)], [(5 * i) % 250 + 1 for i in range(21)]],
                   reserve_tokens=8)
    d = snap.store.layers[0].head_dim
    full = decode(model, snap, make_method("full"), 5, return_logits=True)
    res = decode(model, snap, make_method("low-rank", rank=d, mode="kv", allow_full_rank=True), 5, return_logits=True)
    assert float((res.logits - full.logits).abs().max()) <= 1e-4


def test_cli_calibrate(tmp_path) -> None:
    res = CliRunner().invoke(app, ["calibrate", "--model", "random:tiny-llama", "--rank", "4", "--rank", "8",
                                   "--tokens", "48", "--output", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "random_tiny-llama-rank4.pt").is_file() and (tmp_path / "random_tiny-llama-rank8.pt").is_file()
