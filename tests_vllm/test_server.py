"""`kvlab serve` with the real 0.5B model and block-route at 1/8, driven by the `openai` client.

One server for the module (on 127.0.0.1, a free port): a needle over 5K+ tokens, 16 concurrent chat
completions, one streamed completion, then a clean shutdown. Every request is bounded in tokens and time.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from conftest import kvlab_server

MODEL = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with kvlab_server(tmp_path_factory.mktemp("serve"), "--model", MODEL, "--method", "block-route", "--budget",
                      "0.125", "--max-model-len", "8192", kv_gib=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", timeout=600, max_retries=0)


def test_startup_logs_the_kvlab_method_once(server):
    lines = [line for line in server["log"].read_text().splitlines() if "kvlab: method" in line]
    assert len(lines) == 1, lines
    assert "kvlab: method block-route (budget=0.125 page_size=32 score=centroid" in lines[0]


def test_needle_over_5k_tokens_is_answered_at_budget_one_eighth(client):
    from transformers import AutoTokenizer

    from kvlab.experiments.texts import text_tokens
    from kvlab.models.builtin import BUILTIN_MODELS, converted_dir

    tokenizer = AutoTokenizer.from_pretrained(str(converted_dir(BUILTIN_MODELS[MODEL])))
    hay = text_tokens(tokenizer, "prose", 5600, seed=7)
    before, after = tokenizer.decode(hay[:2600]), tokenizer.decode(hay[2600:])
    content = ("Read the text below. Somewhere in it is a piece of information you will be asked about.\n\n"
               f"{before}\nThe pass key is 48213. Remember it. 48213 is the pass key.\n{after}\n\n"
               "What is the pass key? Answer with the number only.")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_tokens=12, temperature=0)
    assert reply.usage.prompt_tokens >= 5000
    assert "48213" in reply.choices[0].message.content


def test_sixteen_concurrent_chat_completions(server):
    from openai import AsyncOpenAI

    topics = ["reverse a string", "sum a list", "check a palindrome", "count vowels", "merge two dicts",
              "flatten a list", "find the maximum", "compute a factorial", "read a file", "parse JSON",
              "sort by key", "remove duplicates", "compute fibonacci", "square numbers", "join strings",
              "swap two values"]

    async def ask_all():
        client = AsyncOpenAI(base_url=server["url"] + "/v1", api_key="unused", timeout=600, max_retries=0)
        async with client:
            return await asyncio.gather(*[
                client.chat.completions.create(
                    model=MODEL, max_tokens=24, temperature=0,
                    messages=[{"role": "user", "content": f"Write a one-line Python function to {t}."}])
                for t in topics])

    replies = asyncio.run(asyncio.wait_for(ask_all(), timeout=600))
    assert len(replies) == 16
    for r in replies:
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.choices[0].message.content.strip()
        assert 0 < r.usage.completion_tokens <= 24


def test_one_streamed_completion_arrives_in_chunks(client):
    stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=24, temperature=0,
                                            messages=[{"role": "user", "content": "Count from 1 to 10."}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5
    assert "1" in "".join(pieces)


def test_server_shuts_down_cleanly(server):
    import psutil

    proc = server["proc"]
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, server["log"].read_text()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
