"""Shared fixtures of the vLLM tests (run under .venv-vllm: `make test` does).

A vLLM engine takes 20-40 s to start on 2 cores, so each test module shares its engines
(module-scoped fixtures) and most tests use a tiny random-weight model directory made here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before vLLM is imported anywhere: a small KV pool, kvlab's selection record on, and functions for
# LLM.apply_model (the test's own inspection helpers) sent to the worker.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["KVLAB_VLLM_RECORD"] = "1"
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("KVLAB_QUIET", "1")


def pin_worker() -> None:
    """Under pytest-xdist (``make test``: two workers), worker ``gwN`` runs on its own core, its vLLM engines'
    threads bound there too: two engines sharing a core stall each other past vLLM's execute-model timeout.
    The tests marked ``both_cores`` (two ranks) run afterwards in one process over every core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    cores = sorted(os.sched_getaffinity(0))
    core = cores[int(worker.removeprefix("gw")) % len(cores)]
    os.sched_setaffinity(0, {core})
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    os.environ["OMP_NUM_THREADS"] = "1"


pin_worker()

# The slowest files of make test's parallel phase (clean clone, 2026-12-06: each 2-5 min on one core), first:
# with --no-loadscope-reorder xdist hands out files in this order, so the last file a worker takes is a short
# one instead of a server test that keeps one core busy while the other idles.
SLOWEST_FIRST = ("test_eviction_server.py", "test_scorer_server.py", "test_eviction_engine.py",
                 "test_scorer_engine.py", "test_ruler.py", "test_server.py", "test_engine.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


TINY_VOCAB = 512


def make_tiny_model(path: Path) -> Path:
    """A 4-layer Qwen2 with random weights (2 KV heads, 4 query heads, head_dim 64), saved as safetensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, initializer_range=0.25)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


def start_llm(model: Path, kvlab: dict | None, **kw):
    from vllm import LLM

    extra = {"kvlab": kvlab} if kvlab is not None else {}
    kw = {"block_size": 128, "max_num_seqs": 8, "max_model_len": 4096, **kw}
    return LLM(model=str(model), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
               seed=0, additional_config=extra, **kw)


LENGTHS = (1500, 700, 2100, 300)  # a mixed batch: different lengths, prefills beside decodes
NEW_TOKENS = 24


def prompts(lengths, seed):
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    return [TokensPrompt(prompt_token_ids=[rng.randrange(TINY_VOCAB) for _ in range(n)]) for n in lengths]


def greedy(llm, batch, max_tokens=NEW_TOKENS):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]


@pytest.fixture(scope="session")
def vanilla_tokens(tiny_model):
    """Greedy tokens of vLLM with the kvlab entry saying ``full`` (vLLM's own attention classes) on
    :data:`LENGTHS` prompts (seed 0), and the attention classes that ran."""
    from kvlab.vllm.backend import reset_records

    llm = start_llm(tiny_model, {"method": "full"})
    try:
        classes = llm.apply_model(reset_records)[0]
        tokens = greedy(llm, prompts(LENGTHS, seed=0))
    finally:
        stop_llm(llm)
    return classes, tokens


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# ---------------------------------------------------------------- a real `kvlab serve` on 127.0.0.1
@contextlib.contextmanager
def kvlab_server(log_dir: Path, *args: str, kv_gib: int = 2) -> Iterator[dict]:
    """``kvlab serve *args`` on a free port of 127.0.0.1 with a ``kv_gib`` GiB KV pool, once ``/health``
    answers: ``{"url", "proc", "log"}`` (the benchmark's own server runner: stopped, group and all, on the
    way out)."""
    from kvlab.experiments.bench_vllm_throughput import free_port, served

    log_path = log_dir / "serve.log"
    cut = args.index("--") if "--" in args else len(args)  # vLLM's own options stay last
    argv = [sys.executable, "-m", "kvlab", "serve", *args[:cut], "--port", str(free_port()), "--kv-cache-gib",
            str(kv_gib), *args[cut:]]
    with served(argv, log_path, args[args.index("--method") + 1] if "--method" in args else "full") as (url, proc):
        yield {"url": url, "proc": proc, "log": log_path}


def metrics(url: str) -> dict[str, float]:
    """vLLM's ``/metrics`` by name (summed over label sets: one engine), and ``pool_blocks``: the KV pool in
    blocks (``vllm:cache_config_info``'s ``num_gpu_blocks`` label)."""
    from kvlab.experiments.bench_vllm_throughput import metric_labels, scrape

    samples = scrape(url)
    out: dict[str, float] = {}
    for name, _, value in samples:
        out[name] = out.get(name, 0.0) + value
    out["pool_blocks"] = float(metric_labels(samples, "vllm:cache_config_info")["num_gpu_blocks"])
    return out


def blocks_in_use(url: str) -> int:
    """vLLM's gauge ``vllm:kv_cache_usage_perc`` is ``1 - free / (pool - 1)``."""
    m = metrics(url)
    return round(m["vllm:kv_cache_usage_perc"] * (m["pool_blocks"] - 1))


def ask_pass_key(url: str, model: str, tokenizer, tokens: int, at: int, max_tokens: int = 24,
                 sample_after: int = 3) -> tuple[str, int | None, int | None]:
    """A pass key (48213) at token ``at`` of ``tokens`` tokens of prose, the question at the end, streamed from
    the server at ``url`` through the ``openai`` client: ``(answer, blocks in use once ``sample_after`` pieces
    arrived -- decoding, so the scheduler has freed what eviction reported --, prompt tokens)``."""
    from openai import OpenAI

    from kvlab.experiments.texts import text_tokens

    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    hay = text_tokens(tokenizer, "prose", tokens, seed=7)
    before, after = tokenizer.decode(hay[:at]), tokenizer.decode(hay[at:])
    content = ("Read the text below. Somewhere in it is a piece of information you will be asked about.\n\n"
               f"{before}\nThe pass key is 48213. Remember it. 48213 is the pass key.\n{after}\n\n"
               "What is the pass key? Answer with the number only.")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, in_use, prompt_tokens = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if len(pieces) == sample_after:
                in_use = blocks_in_use(url)
    return "".join(pieces), in_use, prompt_tokens


@pytest.fixture(scope="session")
def kvlab_model(tiny_model):
    """The tiny model in transformers, for kvlab's own engine (the reference of the vLLM runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def tokenizer():
    """The real 0.5B model's tokenizer (the server tests' prompts)."""
    from transformers import AutoTokenizer

    from kvlab.models.builtin import BUILTIN_MODELS, converted_dir

    return AutoTokenizer.from_pretrained(str(converted_dir(BUILTIN_MODELS["qwen2.5-coder-0.5b"])))

