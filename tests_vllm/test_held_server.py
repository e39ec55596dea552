"""`kvlab serve --method h2o --budget-tokens 256 -- --tensor-parallel-size 2` with the real 0.5B model:
decode-time eviction through the server, on two ranks (one KV head each; kvlab serve binds each rank to a
core). One long generation whose blocks, sampled from vLLM's own ``/metrics`` while it streams, stop growing
once the request holds its 256 tokens per KV head; then 32 concurrent completions that all complete, all
held, and give every block back. One server (127.0.0.1, a free port, a 1 GiB pool); every request bounded in
tokens and time."""

from __future__ import annotations

import asyncio

import pytest
from test_eviction_server import MODEL, PAGE, prose_prompt, wait_until

from conftest import blocks_in_use, kvlab_server, metrics

pytestmark = pytest.mark.both_cores  # two ranks, a core each

BUDGET = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with kvlab_server(tmp_path_factory.mktemp("serve-h2o"), "--model", MODEL, "--method", "h2o", "--budget-tokens",
                      str(BUDGET), "--max-model-len", "4096", "--", "--tensor-parallel-size", "2", kv_gib=1) as srv:
        yield srv


def test_a_long_generation_holds_its_blocks_flat(server, tokenizer):
    from openai import OpenAI

    url = server["url"]
    log = server["log"].read_text()
    assert "kvlab: h2o frees vLLM's KV blocks" in log and "Worker_TP1" in log  # the second rank's worker
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=900, max_retries=0)
    stream = client.completions.create(model=MODEL, prompt=prose_prompt(tokenizer, 1000, 5), max_tokens=500,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usage, pieces, generated = [], 0, 0
    for chunk in stream:
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            pieces += 1
            if pieces % 20 == 0:
                usage.append(blocks_in_use(url))
    assert generated == 500 and len(usage) >= 20
    held = -(-BUDGET // PAGE) + -(-33 // PAGE) + 1  # the kept tokens' pages, those since the last compaction
    assert max(usage) <= held < -(-(1000 + 500) // PAGE), usage  # vanilla would end at 12 pages
    assert max(usage[len(usage) // 2:]) <= max(usage[: len(usage) // 2]), usage  # flat, not growing
    assert "served without h2o" not in server["log"].read_text()
    wait_until(lambda: blocks_in_use(url) == 0, 30, "every block back once the request finished")


def test_thirty_two_concurrent_requests_all_held_and_all_blocks_back(server, tokenizer):
    from openai import AsyncOpenAI

    url = server["url"]
    prompts = [prose_prompt(tokenizer, 300 + 10 * i, 200 + i) for i in range(32)]

    async def ask_all():
        async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=900, max_retries=0) as client:
            return await asyncio.gather(*[
                client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}) for p in prompts])

    replies = asyncio.run(asyncio.wait_for(ask_all(), timeout=900))
    assert [r.usage.completion_tokens for r in replies] == [8] * 32
    assert all(r.usage.prompt_tokens > BUDGET for r in replies)  # every prompt held at its end
    assert "served without h2o" not in server["log"].read_text()
    wait_until(lambda: blocks_in_use(url) == 0 and metrics(url)["vllm:num_requests_running"] == 0, 30,
               "every request finished and every block back")
