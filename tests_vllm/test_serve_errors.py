"""`kvlab serve` refuses bad input before vLLM starts: one line, exit code 2, nothing written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvlab.cli import app
from kvlab.errors import KVLabError

pytestmark = pytest.mark.both_cores  # the cores a rank needs, and the rank binding, are this process's


def serve(*args: str):
    result = CliRunner().invoke(app, ["serve", *args])
    assert isinstance(result.exception, KVLabError), (result.exception, result.output)
    return str(result.exception)


@pytest.mark.parametrize("args, words", [
    (["--method", "nope"], ["unknown method 'nope'", "vLLM runs: full, block-route, streaming, kv-compress"]),
    (["--method", "cluster-route", "--budget", "0.1"], ["cannot run inside vLLM", "full, block-route"]),
    (["--method", "ada-snapkv", "--budget", "0.25"], ["cannot run inside vLLM", "per-head block tables"]),
    (["--method", "h2o", "--budget", "0.25", "-p", "page=128"], ["page keeps whole pages once",
                                                                  "decode_evict=false"]),
    (["--method", "snapkv", "--budget", "0.25", "-p", "page=64"], ["page is vLLM's page size"]),
    (["--method", "snapkv"], ["snapkv needs a budget"]),
    (["--method", "kv-compress"], ["kv-compress needs a budget"]),
    (["--method", "streaming"], ["streaming needs a budget", "(or window)"]),
    (["--method", "kv-compress", "--budget", "0.25", "-p", "rates=head"], ["rates='head' cannot run inside vLLM",
                                                                          "uniform, layer"]),
    (["--method", "kv-compress", "--budget", "0.25", "-p", "interval=16"], ["interval=16 is not supported"]),
    (["--method", "streaming", "--budget", "0.25", "-p", "block_size=64"], ["has no parameter 'block_size'"]),
    (["--method", "oracle-blocks", "--budget", "0.1"], ["cannot run inside vLLM"]),
    (["--method", "block-route", "--budget", "1.5"], ["budget must be in (0, 1]"]),
    (["--method", "block-route", "--ratio", "1.0"], ["ratio must be in [0, 1)"]),
    (["--method", "block-route", "--budget-tokens", "0"], ["budget_tokens must be a positive"]),
    (["--method", "block-route"], ["needs a budget"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "score_block=48"], ["score_block 48 does not divide"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "score_block=256"], ["score_block 256 does not divide"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "score_block=24"], ["score_block 24 does not divide"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "score_block=0"], ["score_block must be a power of two"]),
    (["--method", "block-route", "--budget", "0.1", "--block-size", "96"], ["power-of-two page size"]),
    (["--method", "block-route", "--budget", "0.1", "--block-size", "48"], ["multiple of 32"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "refresh=4"], ["refresh=4 is not supported"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "colour=red"], ["has no parameter 'colour'"]),
    (["--method", "block-route", "--budget", "0.1", "-p", "per_head=maybe"], ["per_head takes true or false"]),
    (["--method", "streaming", "--budget", "0.1", "-p", "per_head=true"], ["has no parameter 'per_head'"]),
])
def test_bad_method_configuration(args, words):
    message = serve(*args)
    for w in words:
        assert w in message


@pytest.mark.parametrize("extra, words", [
    (["--enable-prefix-caching"], ["drop --enable-prefix-caching"]),
    (["-pp=2"], ["pipeline parallel size 1 (tensor parallel is served), got 2"]),
    (["--tensor-parallel-size", "two"], ["--tensor-parallel-size must be a whole number >= 1, got 'two'"]),
    ([f"-tp={len(os.sched_getaffinity(0)) + 1}"], ["needs a core per rank on vLLM's CPU build"]),
    (["--worker-cls", "my.Worker"], ["runs with kvlab's own --worker-cls"]),
    (["--kv-cache-dtype", "fp8"], ["--kv-cache-dtype must be auto, got fp8"]),
])
def test_vllm_options_eviction_does_not_run_with(tiny_model, extra, words):
    message = serve("--model", str(tiny_model), "--method", "kv-compress", "--budget", "0.25", "--", *extra)
    for w in words:
        assert w in message


def test_a_method_that_reads_every_kv_head_is_refused_on_two_ranks(tiny_model):
    message = serve("--model", str(tiny_model), "--method", "tova", "--budget", "0.25", "--", "-tp", "2")
    assert "tova chooses from the attention of every KV head of a layer" in message
    assert "--tensor-parallel-size 1" in message


def test_eviction_on_a_model_with_sliding_window_layers(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "num_hidden_layers": 6,
                                                      "sliding_window": 512, "max_position_embeddings": 8192}))
    message = serve("--model", str(tmp_path), "--method", "streaming", "--budget", "0.25")
    assert "streaming inside vLLM runs on full-attention models only" in message


def test_model_that_is_neither_builtin_nor_a_directory_with_a_config(tmp_path):
    message = serve("--model", str(tmp_path))
    assert "neither a built-in model" in message and "config.json" in message
    assert "neither a built-in model" in serve("--model", "no-such-model")


def test_dense_layers_outside_the_model(tiny_model):
    message = serve("--model", str(tiny_model), "--method", "block-route", "--budget", "0.1", "-p", "dense_layers=9")
    assert "dense_layers=9 is outside the model" in message


def test_max_model_len_beyond_the_model(tiny_model):
    assert "--max-model-len must be in 1..8192" in serve("--model", str(tiny_model), "--max-model-len", "100000")


def test_port_in_use(tiny_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = serve("--model", str(tiny_model), "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in message and "--port" in message


def test_unconverted_builtin_in_this_environment_writes_nothing(tmp_path):
    env = {**os.environ, "KVLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "kvlab", "serve", "--model", "qwen2.5-coder-0.5b"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'qwen2.5-coder-0.5b' is not converted yet")
    assert "kvlab.load('qwen2.5-coder-0.5b')" in lines[0]
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_kv_pool_must_be_a_positive_size():
    assert "--kv-cache-gib must be a whole number of GiB >= 1, got 0" in serve("--kv-cache-gib", "0")


def test_a_pool_that_cannot_hold_one_request_is_refused(tiny_model):
    message = serve("--model", str(tiny_model), "--method", "h2o", "--budget", "0.25", "--max-model-len", "4096",
                    "--kv-cache-gib", "1", "--", "--num-gpu-blocks-override", "20")
    assert message == (f"vLLM's KV pool holds 2432 tokens of {tiny_model.name} in bfloat16 (20 pages of 128), fewer "
                       "than one request of --max-model-len 4096: raise --kv-cache-gib (or "
                       "--num-gpu-blocks-override) or lower --max-model-len")
