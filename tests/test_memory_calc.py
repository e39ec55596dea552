"""The KV-cache calculator against the formula and hand-checked numbers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvlab.cli import app
from kvlab.errors import KVLabError
from kvlab.experiments.memory_calc import (
    ModelShape,
    Strategy,
    cache_bytes,
    memory_table,
    model_shape,
    shape_from_config,
    sharing_layers,
    strategies,
)


def formula(layers: int, kv: int, d: int, tokens: int, nbytes: float, batch: int = 1) -> float:
    return layers * kv * d * tokens * 2 * nbytes * batch


def test_llama_8b_is_128_kib_per_token_bf16() -> None:
    shape = model_shape("llama-3.1-8b")
    assert (shape.num_layers, shape.kv_heads, shape.head_dim) == (32, 8, 128)
    assert cache_bytes(shape, 1, dtype="bfloat16") == 128 * 1024  # 32 x 8 x 128 x 2 x 2 bytes
    assert cache_bytes(shape, 131072, dtype="bfloat16") == 16 * 2**30


def test_llama_70b_at_128k_is_about_40_gb() -> None:
    b = cache_bytes(model_shape("llama-3.1-70b"), 131072, dtype="bf16")
    assert b == formula(80, 8, 128, 131072, 2) == 40 * 2**30


@pytest.mark.parametrize("name,layers,kv,d", [("qwen2.5-7b", 28, 4, 128), ("mistral-7b", 32, 8, 128),
                                              ("llama-3.2-1b", 16, 8, 64)])
@pytest.mark.parametrize("ctx,batch,dtype,nbytes", [(8192, 1, "bfloat16", 2), (32768, 4, "float32", 4)])
def test_formula_on_known_configs(name, layers, kv, d, ctx, batch, dtype, nbytes) -> None:
    assert cache_bytes(model_shape(name), ctx, batch, dtype) == formula(layers, kv, d, ctx, nbytes, batch)


def test_sliding_window_layers_cap_at_the_window() -> None:
    shape = model_shape("gemma-3-27b")  # 62 layers, 10 global (every 6th), window 1024
    assert shape.local_layers == 52
    per_layer_token = 16 * 128 * 2 * 2
    assert cache_bytes(shape, 131072) == (10 * 131072 + 52 * 1024) * per_layer_token
    assert cache_bytes(shape, 512) == 62 * 512 * per_layer_token


def test_strategies_each_change_one_factor() -> None:
    shape = model_shape("llama-3.1-8b")
    base = cache_bytes(shape, 8192)
    assert cache_bytes(shape, 8192, strategy=Strategy(kv_heads=2)) == base / 4
    assert cache_bytes(shape, 8192, strategy=Strategy(mla=(512, 64))) == 32 * 8192 * 576 * 2
    assert cache_bytes(shape, 8192, strategy=Strategy(share_fraction=0.5)) == base / 2
    assert cache_bytes(shape, 8192, strategy=Strategy(keep=0.25)) == base / 4
    lg = cache_bytes(shape, 8192, strategy=Strategy(local_global=(5, 512)))
    globals_ = len([i for i in range(32) if (i + 1) % 6 == 0])  # 5
    assert lg == (globals_ * 8192 + (32 - globals_) * 512) * 8 * 128 * 2 * 2
    # int8: 1 byte per number + fp16 scale/min per channel per 32 keys and per token for values
    int8 = cache_bytes(shape, 8192, strategy=Strategy(bits=8, group=32))
    assert int8 == pytest.approx(32 * 8192 * 8 * 128 * 2 * (1 + (4 / 32 + 4 / 128) / 2))
    int4 = cache_bytes(shape, 8192, strategy=Strategy(bits=4, group=32))
    assert int4 == pytest.approx(32 * 8192 * 8 * 128 * 2 * (0.5 + (4 / 32 + 4 / 128) / 2))


def test_sharing_stays_within_a_kind() -> None:
    assert sharing_layers(8, 0.5) == [1, 3, 5, 7]
    windows = [4, 4, None, 4, 4, None]
    shared = sharing_layers(windows, 0.5)
    assert shared == [1, 4, 5]  # local layers 0,1,3,4 -> 1 and 4 share; global 2,5 -> 5 shares
    assert sharing_layers(8, 0.0) == []


def test_table_rows_and_baseline() -> None:
    shape = model_shape("qwen2.5-7b")
    rows = memory_table(shape, [8192, 32768], rows=strategies(shape))
    assert rows[0].vs_baseline == 1.0 and rows[0].strategy.startswith("baseline")
    assert {r.context for r in rows} == {8192, 32768}
    assert any(r.strategy.startswith("stacked") for r in rows)


def test_hf_config_file_and_text_config(tmp_path) -> None:
    cfg = {"text_config": {"num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
                           "head_dim": 32, "sliding_window": 16,
                           "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(str(tmp_path))
    assert shape.layer_windows == (16, 16, 16, 16, 16, None)
    assert cache_bytes(shape, 100, dtype="float32") == (5 * 16 + 100) * 2 * 32 * 2 * 4


def test_missing_fields_are_a_clear_error(tmp_path) -> None:
    with pytest.raises(KVLabError, match="lacks num_hidden_layers"):
        shape_from_config({"num_attention_heads": 8, "hidden_size": 64}, "x")
    (tmp_path / "bad.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(KVLabError, match="num_attention_heads"):
        model_shape(str(tmp_path / "bad.json"))
    with pytest.raises(KVLabError, match="unknown model"):
        model_shape("no-such-model")
    with pytest.raises(KVLabError, match="bits must be 4 or 8"):
        cache_bytes(model_shape("llama-3.1-8b"), 10, strategy=Strategy(bits=3))


def test_gguf_metadata(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(4)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_embedding_length(256)
    w.add_context_length(4096)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shape = model_shape(str(path))
    assert (shape.num_layers, shape.kv_heads, shape.head_dim) == (4, 2, 32)
    assert cache_bytes(shape, 10, dtype="float16") == formula(4, 2, 32, 10, 2)


def test_builtin_names() -> None:
    shape = model_shape("qwen2.5-coder-0.5b")
    assert (shape.num_layers, shape.kv_heads, shape.head_dim) == (24, 2, 64)
    g = model_shape("gemma3-270m")
    assert g.local_layers == 15 and g.head_dim == 256
    q = model_shape("qwen2.5-coder-1.5b")
    assert (q.num_layers, q.kv_heads, q.head_dim, q.max_context) == (28, 2, 128, 32768)
    assert cache_bytes(q, 1, dtype="bfloat16") == formula(28, 2, 128, 1, 2) == 28 * 1024


def test_every_builtin_model_has_a_shape_before_conversion(monkeypatch, tmp_path) -> None:
    from kvlab.models.builtin import BUILTIN_MODELS

    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))  # nothing converted: the built-in table answers
    for name in BUILTIN_MODELS:
        assert model_shape(name).num_layers > 0, name


def test_cli_table_and_json() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["memory", "--model", "llama-3.1-8b", "--context", "131072"])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.output and "16.000" in res.output
    res = runner.invoke(app, ["memory", "-m", "llama-3.1-70b", "--context", "128k", "--json"])
    data = json.loads(res.output)
    assert data["rows"][0]["gib"] == 40.0
    res = runner.invoke(app, ["memory", "-m", "llama-3.1-8b", "--bits", "3"])
    assert res.exit_code != 0


def test_shape_validation() -> None:
    with pytest.raises(KVLabError):
        ModelShape("x", 2, 1, 8, layer_windows=(None,))
