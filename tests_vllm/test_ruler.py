"""RULER's ``--engine vllm``: lm-eval's ``local-completions`` client against a real ``kvlab serve`` on 127.0.0.1
(the real 0.5B model, float32, plain vLLM), on lm-eval's samples: the answers are scored by lm-eval and equal
kvlab's own engine's (question-aware, uncompressed: the equivalence the compressed cells are compared from)."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")  # installed by `make test` (the [ruler] extra)

from kvlab.experiments import ruler  # noqa: E402
from kvlab.experiments.runner import Cells, spec  # noqa: E402
from kvlab.models.builtin import BUILTIN_MODELS, converted_dir  # noqa: E402

MODEL = "qwen2.5-coder-0.5b"
LENGTH = 1024
NEW = 12


def test_vllm_engine_answers_through_lm_evals_client_as_kvlabs_engine_does(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvlab.experiments.ruler_vllm import run_vllm

    directory = str(converted_dir(BUILTIN_MODELS[MODEL]))
    samples = ruler.load_samples(tmp_path / "samples.json", directory, ["niah_single_1"], LENGTH, 2)
    cells = Cells(tmp_path / "cells")
    served = run_vllm(directory, MODEL, samples, [("full", 0.0)], cells, LENGTH, NEW, log_dir=tmp_path)
    assert [(c["engine"], c["method"], c["mode"]) for c in served] == [("vllm", "full", "aware")] * 2
    for c, s in zip(served, samples, strict=True):  # lm-eval's score: is the needle in the answer
        assert c["score"] == float(s.doc["outputs"][0] in c["answer"]) == 1.0, c["answer"]

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    ours = ruler.run_kvlab(model, tok, MODEL, samples, [spec("full")], [0.5], ["aware"], cells, [], LENGTH, NEW)
    rows = ruler.agreement(served + ours, "kvlab", "vllm")
    assert rows == [{"method": "full", "ratio": 0.0, "mode": "aware", "samples": 2, "differ": 0, "same answer": 2,
                     "kvlab - vllm": 0.0, "ci95": 0.0, "agree": True}]  # the same greedy answers, word for word


@pytest.mark.parametrize("args, message", [
    (["--block-size", "48"], "multiple of 32"),
    (["-p", "per_head=maybe"], "per_head takes true or false"),
])
def test_a_page_or_parameter_the_server_refuses_is_one_line_before_any_server(tmp_path, args, message):
    from typer.testing import CliRunner

    from kvlab.cli import app
    from kvlab.errors import KVLabError

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "ruler", "--engine", "vllm", "--method", "block-route", "--out",
                                      str(out), *args])
    assert isinstance(result.exception, KVLabError) and message in str(result.exception)
    assert not out.exists()
