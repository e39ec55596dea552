"""`kvlab serve --method kv-compress --budget 0.25` with the real 0.5B model, driven by the `openai` client.

One server for the module (127.0.0.1, a free port, a 1 GiB KV pool): a needle over 5K+ tokens with the
question inside the observation window, answered while vLLM's own ``/metrics`` shows the request's
evicted blocks back in the pool; then 32 concurrent completions that are all compressed, all complete,
never use more blocks than the pool, and leave the server up. Every request is bounded in tokens and time.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import pytest

from conftest import ask_pass_key, blocks_in_use, kvlab_server, metrics

MODEL = "qwen2.5-coder-0.5b"
PAGE = 128
WINDOW = 32  # observation window: the question and the chat template's closing tokens fit in it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with kvlab_server(tmp_path_factory.mktemp("serve-evict"), "--model", MODEL, "--method", "kv-compress",
                      "--budget", "0.25", "-p", f"window={WINDOW}", "--max-model-len", "8192", kv_gib=1) as srv:
        yield srv


def test_startup_logs_the_eviction(server):
    log = server["log"].read_text()
    assert "kvlab: kv-compress frees vLLM's KV blocks" in log
    assert "kvlab: prefix caching is off for kv-compress" in log


def test_needle_at_one_quarter_while_metrics_show_the_evicted_blocks_free(server, tokenizer):
    tail = "\n\nWhat is the pass key? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n"
    assert len(tokenizer.encode(tail)) <= WINDOW  # the question and the template's closing tokens are observed
    answer, in_use, prompt_tokens = ask_pass_key(server["url"], MODEL, tokenizer, 5600, 2600, max_tokens=40,
                                                 sample_after=4)
    assert prompt_tokens >= 5000
    assert "48213" in answer
    prompt_pages = -(-prompt_tokens // PAGE)
    unprotected = prompt_tokens // PAGE  # the protected last tokens sit in the partial last page
    assert in_use is not None and 0 < in_use <= prompt_pages - 0.7 * unprotected, (in_use, prompt_pages)


def test_thirty_two_concurrent_requests_all_compressed_within_the_pool(server, tokenizer):
    from openai import AsyncOpenAI

    from kvlab.experiments.texts import text_tokens

    url = server["url"]
    contents = [tokenizer.decode(text_tokens(tokenizer, "prose", 600 + 20 * i, seed=100 + i))
                + "\n\nSummarise the text above in one sentence." for i in range(32)]
    samples, done = [], threading.Event()

    def watch():
        while not done.is_set():
            m = metrics(url)
            samples.append((m["vllm:kv_cache_usage_perc"], m["vllm:num_requests_running"]))
            time.sleep(0.25)

    async def ask_all():
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
        async with client:
            return await asyncio.gather(*[
                client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                               messages=[{"role": "user", "content": c}]) for c in contents])

    before = server["log"].read_text().count("served without kv-compress")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        replies = asyncio.run(asyncio.wait_for(ask_all(), timeout=900))
    finally:
        done.set()
        watcher.join(timeout=10)
    assert len(replies) == 32
    for r in replies:
        assert r.choices[0].finish_reason in ("stop", "length")
        assert 0 < r.usage.completion_tokens <= 16 and r.usage.prompt_tokens >= 600
    assert samples and all(usage <= 1.0 for usage, _ in samples)
    assert max(running for _, running in samples) >= 2  # they ran concurrently
    assert server["log"].read_text().count("served without kv-compress") == before  # every one compressed
    assert blocks_in_use(url) == 0  # all finished: every block back in the pool
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        assert r.status == 200
