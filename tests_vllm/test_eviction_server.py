"""`kvlab serve --method kv-compress --budget 0.25` with the real 0.5B model, driven by the `openai` client.

One server for the module (127.0.0.1, a free port, a 1 GiB KV pool): a needle over 5K+ tokens with the
question inside the observation window, answered while vLLM's own ``/metrics`` shows the request's
evicted blocks back in the pool; then 32 concurrent completions that are all compressed, all complete,
never use more blocks than the pool, and leave the server up; then clients that go away (a stream closed while
decoding, a request cancelled while its prompt is prefilled in chunks): each request is aborted, its blocks
and kvlab's records of it are released, and the server keeps answering. Every request is bounded in tokens
and time.
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


def prose_prompt(tokenizer, tokens: int, seed: int) -> str:
    from kvlab.experiments.texts import text_tokens

    return tokenizer.decode(text_tokens(tokenizer, "prose", tokens, seed=seed)) + "\n\nContinue the text."


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.25)


def idle(url: str) -> bool:
    m = metrics(url)
    return m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 and blocks_in_use(url) == 0


def test_clients_that_go_away_are_aborted_and_their_blocks_return(server, tokenizer):
    from openai import AsyncOpenAI, OpenAI

    url = server["url"]
    endless = {"temperature": 0, "extra_body": {"ignore_eos": True}}  # with max_tokens: minutes, unless aborted
    assert idle(url)

    # a stream closed while decoding (a compressed request: its kept pages and kvlab's record of it)
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    stream = client.completions.create(model=MODEL, prompt=prose_prompt(tokenizer, 1500, 1), stream=True,
                                    max_tokens=4000, **endless)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].text)
        if pieces == 3:
            break
    assert blocks_in_use(url) > 0
    stream.close()
    wait_until(lambda: idle(url), 60, "the closed stream's request aborted and its blocks back in the pool")

    # a request cancelled while its prompt (longer than one step's token budget) is still being prefilled
    async def cancel_during_prefill():
        async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0) as aclient:
            task = asyncio.create_task(aclient.completions.create(
                model=MODEL, prompt=prose_prompt(tokenizer, 7000, 2), max_tokens=1000, **endless))
            await asyncio.to_thread(wait_until, lambda: metrics(url)["vllm:num_requests_running"] == 1, 120,
                                    "the long prompt scheduled")
            await asyncio.sleep(1.0)
            prefilling = metrics(url)["vllm:generation_tokens_total"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return prefilling

    generated_before = metrics(url)["vllm:generation_tokens_total"]
    at_cancel = asyncio.run(cancel_during_prefill())
    wait_until(lambda: idle(url), 60, "the cancelled request aborted and its blocks back in the pool")
    assert at_cancel == generated_before  # cancelled before its first token: inside the chunked prefill

    # the server goes on serving, and compressing
    before = server["log"].read_text().count("served without kv-compress")
    reply = client.completions.create(model=MODEL, prompt=prose_prompt(tokenizer, 800, 3), max_tokens=8,
                                      **endless)
    assert reply.usage.completion_tokens == 8
    assert server["log"].read_text().count("served without kv-compress") == before
    assert idle(url)
