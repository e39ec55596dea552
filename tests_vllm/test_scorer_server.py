"""`kvlab serve --method snapkv|pyramidkv|tova --budget 0.25` with the real 0.5B model, driven by the `openai`
client: a pass key in ~3K tokens of prose, the question at the end (inside SnapKV's observation window; TOVA
scores with the last query), answered while vLLM's own ``/metrics`` shows the request's evicted pages back in
the pool. One server per method (127.0.0.1, a free port, a 1 GiB KV pool); every request bounded in tokens and
time."""

from __future__ import annotations

import pytest
from test_eviction_server import MODEL, PAGE

from conftest import ask_pass_key, kvlab_server

SCORERS = ["snapkv", "pyramidkv", "tova"]


@pytest.fixture(scope="module", params=SCORERS)
def server(request, tmp_path_factory):
    name = request.param
    with kvlab_server(tmp_path_factory.mktemp(f"serve-{name}"), "--model", MODEL, "--method", name,
                      "--budget", "0.25", "--max-model-len", "4096", kv_gib=1) as srv:
        yield name, srv


def test_needle_at_one_quarter_with_its_pages_free(server, tokenizer):
    from kvlab.commands.serve import model_facts, resolve_model

    name, srv = server
    assert f"kvlab: {name} frees vLLM's KV blocks" in srv["log"].read_text()
    answer, in_use, prompt_tokens = ask_pass_key(srv["url"], MODEL, tokenizer, 3000, 1300)
    assert prompt_tokens >= 2800
    # pyramidkv's layers keep different counts: one KV-cache group per layer, so vLLM counts layer-pages
    groups = model_facts(resolve_model(MODEL)[0])["layers"] if name == "pyramidkv" else 1
    prompt_pages = -(-prompt_tokens // PAGE)
    assert in_use is not None and 0 < in_use <= groups * (prompt_pages - 0.6 * (prompt_tokens // PAGE)), \
        (in_use, groups, prompt_pages)
    assert "48213" in answer, (name, answer)
