"""quantize: error bounds per bit width, exact packed byte counts, composition, bad input."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import kvlab
from kvlab.cache.store import LayerStore
from kvlab.cli import app
from kvlab.errors import KVLabError
from kvlab.generation import decode, prefill
from kvlab.methods import make_method
from kvlab.methods.quantize import QuantizedLayerStore, dequantize, pack, quantize, unpack, with_quantization


@pytest.fixture(scope="module")
def tiny():
    model, tok = kvlab.load("random:tiny-llama")
    snap = prefill(model, [[(7 * i) % 250 + 1 for i in range(150)]], reserve_tokens=16)
    return model, snap


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_error_bound_per_bit_width(bits: int, dim: int) -> None:
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(bits)) * 3
    codes, scale, mn = quantize(x, bits, dim)
    assert codes.max() <= 2**bits - 1
    err = (dequantize(codes, scale, mn) - x).abs()
    # half a step, plus the fp16 rounding of the minimum
    bound = scale.float() / 2 + mn.float().abs() * 2**-11 + 1e-6
    assert bool((err <= bound).all())
    rel = float(err.max() / (x.amax(dim) - x.amin(dim)).max())
    assert rel <= 0.5 / (2**bits - 1) + 1e-3


def test_pack_roundtrip() -> None:
    codes = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, 4), codes)
    assert pack(codes, 8) is codes


def _layer(rows_tokens: int = 100, d: int = 16, heads: int = 2, bs: int = 16) -> LayerStore:
    layer = LayerStore(1, heads, d, bs, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    layer.append(torch.randn(1, heads, rows_tokens, d, generator=g), torch.randn(1, heads, rows_tokens, d, generator=g),
                 torch.arange(rows_tokens)[None])
    return layer


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_byte_counts_exact(bits: int) -> None:
    layer = _layer()
    q = QuantizedLayerStore(layer, bits, group=32)
    slots = int(q.capacity.sum()) * q.block_size
    assert slots % 32 == 0 and slots >= 2 * 100
    d, rows = 16, 2
    expected = (2 * slots * d * bits // 8  # K and V codes
                + (slots // 32) * 2 * d * 2  # fp16 key scale + minimum per channel per group of 32
                + slots * 2 * 2  # fp16 value scale + minimum per token
                + rows * 32 * d * 4)  # fp32 key residual of the open group
    assert q.kv_bytes_allocated() == expected
    assert q.kv_bytes_allocated() < layer.kv_bytes_allocated() * (0.3 if bits == 8 else 0.2) + rows * 32 * d * 4


@pytest.mark.parametrize("bits", [8, 4])
def test_decoded_store_within_bounds_and_appends(bits: int) -> None:
    layer = _layer(100)
    q = QuantizedLayerStore(layer, bits, group=32)
    k0, v0, p0 = layer.dense_view()
    k, v, p = q.dense_view()
    assert torch.equal(p, p0)
    tol = 0.6 * (k0.max() - k0.min()) / (2**bits - 1) + 1e-3
    assert float((k - k0).abs().max()) <= tol and float((v - v0).abs().max()) <= tol
    # the last 100 % 32 = 4 keys are still full precision (KIVI's residual)
    assert torch.equal(k[:, :, 96:], k0[:, :, 96:])
    # appending token by token across a group boundary equals quantizing in one go
    extra_k, extra_v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    for i in range(40):
        q.append(extra_k[:, :, i:i + 1], extra_v[:, :, i:i + 1], torch.tensor([[100 + i]]))
        layer.append(extra_k[:, :, i:i + 1], extra_v[:, :, i:i + 1], torch.tensor([[100 + i]]))
    once = QuantizedLayerStore(layer, bits, group=32)
    assert torch.allclose(q.dense_view()[0], once.dense_view()[0], atol=1e-6)
    assert torch.allclose(q.dense_view()[1], once.dense_view()[1], atol=1e-6)
    assert int(q.lengths[0]) == 140


def test_repack_with_keep(tiny) -> None:
    layer = _layer(64)
    q = QuantizedLayerStore(layer, 8, group=16)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[:, ::2] = True
    q.repack(keep=keep)
    assert q.lengths.tolist() == [32, 32]
    k0 = layer.dense_view()[0][:, :, ::2]
    assert float((q.dense_view()[0] - k0).abs().max()) < 0.05
    assert torch.equal(q.dense_view()[2], layer.dense_view()[2][:, :, ::2])


@pytest.mark.parametrize("bits,tol", [(8, 5e-3), (4, 5e-2)])
def test_generation_close_to_full(tiny, bits: int, tol: float) -> None:
    model, snap = tiny
    full = decode(model, snap, make_method("full"), 6, return_logits=True)
    res = decode(model, snap, make_method("quantize", bits=bits), 6, return_logits=True)
    assert float((res.logits - full.logits).abs().max()) < tol
    assert res.bytes_after_prefill < full.bytes_after_prefill * (0.45 if bits == 8 else 0.3)


def test_composes_under_another_method(tiny) -> None:
    model, snap = tiny
    inner = decode(model, snap, make_method("streaming", budget=0.5), 4)
    both = decode(model, snap, make_method("quantize", bits=4, inner="streaming", budget=0.5), 4)
    assert torch.equal(both.kept_after_prefill, inner.kept_after_prefill)
    assert torch.equal(both.kept_at_end, inner.kept_at_end)
    assert both.bytes_after_prefill < inner.bytes_after_prefill
    wrapped = with_quantization(make_method("streaming", budget=0.5, n_sink=2), bits=8)
    assert wrapped._inner.n_sink == 2 and wrapped.bits == 8
    decode(model, snap, wrapped, 3)


def test_bad_input() -> None:
    with pytest.raises(KVLabError, match="bits must be 4 or 8"):
        make_method("quantize", bits=3)
    with pytest.raises(KVLabError, match="inner"):
        make_method("quantize", bits=8, budget=0.5)
    with pytest.raises(KVLabError, match="unknown method"):
        make_method("quantize", inner="nope", budget=0.5)
    with pytest.raises(KVLabError, match="power of two"):
        make_method("quantize", group=24)


def test_cli_generate_quantize() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--method", "quantize", "--bits", "4",
                              "--prompt", "hello there, this is a prompt", "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert '"bits": 4' in res.output
    res = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--method", "streaming", "--budget", "0.5",
                              "--quantize", "8", "--prompt", "hello there, this is a prompt", "--max-new-tokens", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert '"inner": "streaming"' in res.output and '"bits": 8' in res.output
    res = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--method", "quantize", "--bits", "3",
                              "--prompt", "x"])
    assert res.exit_code != 0


def test_batch_with_left_padding() -> None:
    model, _ = kvlab.load("random:tiny-qwen2")
    snap = prefill(model, [[(3 * i) % 250 + 1 for i in range(70)], [(5 * i) % 250 + 1 for i in range(33)]],
                   reserve_tokens=8)
    full = decode(model, snap, make_method("full"), 5, return_logits=True)
    res = decode(model, snap, make_method("quantize", bits=8, group=16), 5, return_logits=True)
    assert float((res.logits - full.logits).abs().max()) < 5e-3
    assert torch.equal(res.kept_at_end, full.kept_at_end)


@pytest.mark.parametrize("bits,length", [(8, 100), (4, 96), (4, 7)])
def test_dense_fast_path_equals_slot_decode(bits: int, length: int) -> None:
    q = QuantizedLayerStore(_layer(length), bits, group=32)
    t = int(q.lengths.max())
    k, v = q._decode_dense(t)
    k2, v2 = q._decode_slots(q._row_slot_index(t))
    assert torch.allclose(k, k2, atol=1e-6) and torch.allclose(v, v2, atol=1e-6)
