"""`kvlab serve --method snapkv|pyramidkv|tova --budget 0.25` with the real 0.5B model, driven by the `openai`
client: a pass key in ~3K tokens of prose, the question at the end (inside SnapKV's observation window; TOVA
scores with the last query), answered while vLLM's own ``/metrics`` shows the request's evicted pages back in
the pool. One server per method (127.0.0.1, a free port, a 1 GiB KV pool); every request bounded in tokens and
time."""

from __future__ import annotations

import pytest
from test_eviction_server import MODEL, PAGE, blocks_in_use

from conftest import kvlab_server

SCORERS = ["snapkv", "pyramidkv", "tova"]


@pytest.fixture(scope="module", params=SCORERS)
def server(request, tmp_path_factory):
    name = request.param
    with kvlab_server(tmp_path_factory.mktemp(f"serve-{name}"), "--model", MODEL, "--method", name,
                      "--budget", "0.25", "--max-model-len", "4096", kv_gib=1) as srv:
        yield name, srv


def test_needle_at_one_quarter_with_its_pages_free(server, tokenizer):
    from openai import OpenAI

    from kvlab.commands.serve import model_facts, resolve_model
    from kvlab.experiments.texts import text_tokens

    name, srv = server
    assert f"kvlab: {name} frees vLLM's KV blocks" in srv["log"].read_text()
    client = OpenAI(base_url=srv["url"] + "/v1", api_key="unused", timeout=600, max_retries=0)
    hay = text_tokens(tokenizer, "prose", 3000, seed=7)
    before, after = tokenizer.decode(hay[:1300]), tokenizer.decode(hay[1300:])
    content = ("Read the text below. Somewhere in it is a piece of information you will be asked about.\n\n"
               f"{before}\nThe pass key is 48213. Remember it. 48213 is the pass key.\n{after}\n\n"
               "What is the pass key? Answer with the number only.")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, in_use, prompt_tokens = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if len(pieces) == 3:  # decoding: the scheduler has freed what the worker reported after prefill
                in_use = blocks_in_use(srv["url"])
    assert prompt_tokens >= 2800
    # pyramidkv's layers keep different counts: one KV-cache group per layer, so vLLM counts layer-pages
    groups = model_facts(resolve_model(MODEL)[0])["layers"] if name == "pyramidkv" else 1
    prompt_pages = -(-prompt_tokens // PAGE)
    assert in_use is not None and 0 < in_use <= groups * (prompt_pages - 0.6 * (prompt_tokens // PAGE)), \
        (in_use, groups, prompt_pages)
    assert "48213" in "".join(pieces), (name, "".join(pieces))
