"""``kvlab bench vllm --throughput``: how many requests a fixed KV pool serves at once, with and without eviction.

The direction of KV-Compress's throughput table (Rehg 2024, arXiv 2410.00161, "KV-Compress: Paged KV-Cache
Compression with Variable Compression Rates per Attention Head", Table 2 / Figure 1: vLLM with a fixed
memory budget serves more concurrent requests, and so more output tokens/s, once each request's KV
cache is compressed). For each method in turn -- vanilla vLLM (``full``), ``streaming`` and
``kv-compress`` at the same budget -- one ``kvlab serve`` subprocess starts on 127.0.0.1 with a KV pool
of exactly ``kv_blocks`` pages of 128 tokens (vLLM's ``--num-gpu-blocks-override``), and ``requests``
completion requests of ``context``-token needle prompts (:func:`kvlab.experiments.bench_vllm.build_prompts`:
prose with a pass key and the question at the end) asking for ``new_tokens`` greedy tokens each
(``ignore_eos``) are sent at once through ``openai.AsyncOpenAI``. While they run, a thread reads the
server's Prometheus ``/metrics`` every 0.25 s for the largest ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc``, and their mean over the run (:func:`mean_running`); ``vllm:num_preemptions`` is
read at the end.

- output tokens/s: completion tokens of all replies / wall time from sending to the last reply;
- needle: replies whose first :data:`~kvlab.experiments.bench_vllm.ANSWER_TOKENS` tokens hold the key;
- drift: replies whose first :data:`DRIFT_TOKENS` token ids are vanilla's for the same prompt (a long
  generation under decode-time eviction: ``--context 1k --new-tokens 1024 --methods full,h2o,tova,streaming``).

Each method's row is saved as it ends (``row-<method>.json`` in the log folder, ``<out>-logs`` beside
``--out``): the same command again reads back the rows measured with the same options and runs only the rest.

The default pool holds about :data:`HOLD` vanilla requests of the context (prompt + new tokens, plus one
spare page each, plus vLLM's null block), so an eviction method that keeps 1/8 of a request's pages once
its prompt is done can hold several times as many. A request still needs its whole prompt's pages while
it is prefilled (both methods free pages only after the prompt), so the pool also bounds how many prefill
at once.

Cost: on 2 cores vLLM computes on one (its worker is bound to core 0); the 0.5B model prefills 8K-token
prompts at about 200 tokens/s there, so prefill is most of each method's wall time, and the default run
(10 requests of 8K, three servers starting in 1-2 min each) takes about 25 minutes. For the same reason
output tokens/s gain little: vLLM's chunked prefill already decodes running requests inside the prefill
steps, and what eviction removes is only vanilla's decode-only steps while its pool is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.experiments.bench_vllm import ANSWER_TOKENS, NEEDLE_AT, build_prompts
from kvlab.experiments.niah import correct
from kvlab.machine import describe, vllm_version
from kvlab.methods import METHODS as REGISTRY

PAGE = 128  # tokens per vLLM KV page (kvlab serve's default --block-size)
HOLD = 2  # vanilla requests the default pool holds
METHODS = ("full", "streaming", "kv-compress")
METRICS_EVERY_S = 0.25
DRIFT_TOKENS = 64
START_TIMEOUT_S = 900  # a vLLM server starts in 30-60 s on an idle 2-core machine, minutes on a loaded one
STOP_TIMEOUT_S = 60
STALL_S = 600  # no prompt or generated token for this long while requests are out: the server hangs
LOG_TAIL = 3000


# ---------------------------------------------------------------- options
def takes_budget(method: str) -> bool:
    """Whether a method runs with ``--budget`` (vanilla, ``full``, compresses nothing and takes none)."""
    return REGISTRY[method].compresses


def parse_tokens(text: str) -> int:
    """``"8k"`` -> 8192, ``"6000"`` -> 6000."""
    raw = text.strip().lower()
    try:
        return int(float(raw[:-1]) * 1024) if raw.endswith("k") else int(raw)
    except ValueError:
        raise KVLabError(f"--context takes a token count like 8k or 6000, got {text!r}") from None


def pages(tokens: int, page: int = PAGE) -> int:
    return -(-tokens // page)


def default_kv_blocks(context: int, new_tokens: int, page: int = PAGE, hold: int = HOLD) -> int:
    """A pool of ``hold`` vanilla requests: each needs ``ceil((context + new_tokens) / page)`` pages, plus
    one spare page each and vLLM's null block (which the pool counts and never hands out)."""
    return hold * (pages(context + new_tokens, page) + 1) + 1


def block_bytes(config: dict[str, Any], dtype: str, page: int = PAGE) -> int:
    """Bytes of one KV page over all layers (keys and values) for a model's ``config.json``."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    width = 4 if dtype == "float32" else 2
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * width * page


def check_options(context: int, requests: int, new_tokens: int, budget: float, kv_blocks: int | None,
                  max_model_len: int | None, model_limit: int | None) -> tuple[int, int]:
    """Raise KVLabError (one line) on a bad option; return ``(max_model_len, kv_blocks)`` with defaults filled."""
    check(0 < budget <= 1, f"--budget must be in (0, 1], got {budget}")
    check(requests >= 1, f"--requests must be >= 1, got {requests}")
    check(new_tokens >= 1, f"--new-tokens must be >= 1, got {new_tokens}")
    check(context >= 1024, f"--context must be at least 1k tokens (the needle sits up to 2K tokens in, at most "
                           f"half-way), got {context}")
    need = context + new_tokens
    length = need if max_model_len is None else max_model_len
    check(length >= need, f"--context {context} + --new-tokens {new_tokens} = {need} tokens do not fit "
                          f"--max-model-len {length}")
    check(model_limit is None or length <= model_limit,
          f"--context {context} + --new-tokens {new_tokens} need --max-model-len {length}, beyond the model's "
          f"{model_limit} tokens")
    blocks = default_kv_blocks(context, new_tokens) if kv_blocks is None else kv_blocks
    least = pages(length) + 1
    check(blocks >= least, f"--kv-blocks {blocks} cannot hold one request of --max-model-len {length} tokens "
                           f"(vLLM needs {least} pages of {PAGE}: one is its null block)")
    return length, blocks


# ---------------------------------------------------------------- /metrics
def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text -> ``(name, labels, value)`` samples; comments and unparsable lines are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels: dict[str, str] = {}
        if "{" in line:
            name, _, rest = line.partition("{")
            body, _, tail = rest.rpartition("}")
            for part in _split_labels(body):
                key, _, value = part.partition("=")
                labels[key.strip()] = value.strip().strip('"')
        else:
            name, _, tail = line.partition(" ")
        fields = tail.split()
        if not fields:
            continue
        try:
            out.append((name.strip(), labels, float(fields[0])))
        except ValueError:
            continue
    return out


def _split_labels(body: str) -> list[str]:
    """``a="x",b="y,z"`` -> ``['a="x"', 'b="y,z"']`` (commas inside quotes kept)."""
    parts, cur, quoted, escaped = [], [], False, False
    for ch in body:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def metric(samples: list[tuple[str, dict[str, str], float]], name: str) -> float | None:
    """The sum of ``name`` over its label sets (one engine: its value); ``None`` when absent."""
    values = [v for n, _, v in samples if n == name]
    return sum(values) if values else None


def metric_labels(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[str, str]:
    return next((labels for n, labels, _ in samples if n == name), {})


def scrape(url: str, timeout: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as r:
        return parse_prometheus(r.read().decode())


class MetricsWatch:
    """A thread reading ``/metrics`` every :data:`METRICS_EVERY_S`: the peaks and a 1 s timeline."""

    def __init__(self, url: str, every: float = METRICS_EVERY_S) -> None:
        self.url, self.every = url, every
        self.max_running = 0.0
        self.max_waiting = 0.0
        self.max_usage = 0.0
        self.scrapes = self.errors = 0
        self.timeline: list[list[float]] = []  # [t_s, running, waiting, kv usage], about one a second
        self.tokens = 0.0  # prompt + generated tokens so far (progress, for the stall check)
        self.progress_at = time.monotonic()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="kvlab-metrics", daemon=True)

    def __enter__(self) -> MetricsWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        last_mark = -1.0
        while not self._stop.is_set():
            try:
                samples = scrape(self.url)
            except OSError:
                self.errors += 1
            else:
                self.scrapes += 1
                running = metric(samples, "vllm:num_requests_running") or 0.0
                waiting = metric(samples, "vllm:num_requests_waiting") or 0.0
                usage = metric(samples, "vllm:kv_cache_usage_perc") or 0.0
                self.max_running = max(self.max_running, running)
                self.max_waiting = max(self.max_waiting, waiting)
                self.max_usage = max(self.max_usage, usage)
                tokens = ((metric(samples, "vllm:prompt_tokens_total") or 0.0)
                          + (metric(samples, "vllm:generation_tokens_total") or 0.0))
                if tokens != self.tokens:
                    self.tokens, self.progress_at = tokens, time.monotonic()
                t = time.monotonic() - self._t0
                if t - last_mark >= 1.0:
                    self.timeline.append([round(t, 2), running, waiting, round(usage, 4)])
                    last_mark = t
            self._stop.wait(self.every)


# ---------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(model: str, method: str, budget: float, port: int, max_model_len: int, kv_blocks: int,
               kv_cache_gib: int, dtype: str, requests: int, budget_tokens: int | None = None) -> list[str]:
    """``python -m kvlab serve ...`` for one method (``budget_tokens``, when given, instead of the fraction
    ``budget``); the pool is exactly ``kv_blocks`` pages."""
    argv = [sys.executable, "-m", "kvlab", "serve", "--model", model, "--method", method]
    if takes_budget(method):
        argv += ["--budget", str(budget)] if budget_tokens is None else ["--budget-tokens", str(budget_tokens)]
    return argv + ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
                   "--dtype", dtype, "--block-size", str(PAGE), "--kv-cache-gib", str(kv_cache_gib), "--",
                   "--num-gpu-blocks-override", str(kv_blocks), "--max-num-seqs", str(max(requests, 8))]


def log_tail(path: Path, chars: int = LOG_TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def served(argv: list[str], log_path: Path, method: str,
           start_timeout: float = START_TIMEOUT_S) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``argv`` (a ``kvlab serve``) in its own process group until ``/health`` answers; yield
    ``(url, process)``; always stop it: SIGINT to the group, SIGKILL after :data:`STOP_TIMEOUT_S`."""
    port = int(argv[argv.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise KVLabError(f"kvlab serve --method {method} exited with code {proc.returncode} before "
                                 f"answering /health (log {log_path}); its last lines:\n{log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise KVLabError(f"kvlab serve --method {method} did not answer /health within {start_timeout:.0f} s "
                                 f"(log {log_path}); its last lines:\n{log_tail(log_path)}")
            time.sleep(1)
        yield url, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> int | None:
    """SIGINT to the server process, as ``tests_vllm/test_server.py`` stops it (vLLM's API process then stops
    its engine core and worker itself; vLLM 0.32's abort-mode shutdown may still log an EngineDeadError from
    its output handler on the way, with exit code 0), then SIGKILL to the process group for whatever is left
    after :data:`STOP_TIMEOUT_S`; returns the server's exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # the group: vLLM's engine core outlives a killed parent
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    return proc.returncode


# ---------------------------------------------------------------- one method
async def send_all(url: str, served_name: str, prompts: list[list[int]], new_tokens: int, proc: subprocess.Popen,
                   watch: MetricsWatch, log_path: Path, method: str) -> tuple[list[Any], float]:
    """Every prompt at once as a completion request; ``(replies, wall seconds)``. Fails in one line (plus the
    log's tail) when the server exits or makes no progress for :data:`STALL_S`."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=24 * 3600, max_retries=0)
    async with client:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(client.completions.create(
            model=served_name, prompt=ids, max_tokens=new_tokens, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True})) for ids in prompts]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=1.0)
                for task in done:
                    if task.exception() is not None:
                        raise KVLabError(f"a request to kvlab serve --method {method} failed "
                                         f"({type(task.exception()).__name__}: {task.exception()}); log {log_path}, "
                                         f"its last lines:\n{log_tail(log_path)}")
                if pending and proc.poll() is not None:
                    raise KVLabError(f"kvlab serve --method {method} exited with code {proc.returncode} with "
                                     f"{len(pending)} requests out (log {log_path}); its last lines:\n"
                                     f"{log_tail(log_path)}")
                if pending and time.monotonic() - watch.progress_at > STALL_S:
                    raise KVLabError(f"kvlab serve --method {method} made no progress for {STALL_S} s with "
                                     f"{len(pending)} requests out (log {log_path}); its last lines:\n"
                                     f"{log_tail(log_path)}")
            wall = time.perf_counter() - t0
        finally:
            for task in tasks:
                task.cancel()
    return [t.result() for t in tasks], wall


def histogram_mean(samples: list[tuple[str, dict[str, str], float]], name: str) -> float | None:
    total, count = metric(samples, name + "_sum"), metric(samples, name + "_count")
    return total / count if total is not None and count else None


def run_method(method: str, model: str, served_name: str, tokenizer: Any, prompts: list[tuple[list[int], str]],
               budget: float, new_tokens: int, max_model_len: int, kv_blocks: int, kv_cache_gib: int, dtype: str,
               log_dir: Path, groups: int = 1, budget_tokens: int | None = None) -> dict[str, Any]:
    """One server, every request at once: the row of ``method``. ``groups``: KV-cache groups the method's
    engine keeps (one per layer for per-layer page counts), whose pages are 1/``groups`` of a page each, so
    the same memory is ``kv_blocks * groups`` of them."""
    log_path = log_dir / f"serve-{method}.log"
    kv_blocks *= groups
    argv = serve_argv(model, method, budget, free_port(), max_model_len, kv_blocks, kv_cache_gib, dtype, len(prompts),
                      budget_tokens)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with served(argv, log_path, method) as (url, proc):
        startup = time.perf_counter() - t_start
        pool = metric_labels(scrape(url), "vllm:cache_config_info").get("num_gpu_blocks")
        check(pool is None or int(pool) == kv_blocks,
              f"vLLM's pool has {pool} pages, not the {kv_blocks} --num-gpu-blocks-override asked for (log {log_path})")
        with MetricsWatch(url) as watch:
            replies, wall = asyncio.run(send_all(url, served_name, [ids for ids, _ in prompts], new_tokens, proc,
                                                 watch, log_path, method))
        final = scrape(url)
    load_after = os.getloadavg()  # the server has stopped (``served`` stops it on the way out)
    answers, hits, completion, firsts = [], 0, 0, []
    for reply, (_, gold) in zip(replies, prompts, strict=True):
        choice = reply.choices[0]
        ids = getattr(choice, "token_ids", None)
        firsts.append(list(ids or [])[:DRIFT_TOKENS])
        answer = tokenizer.decode(ids[:ANSWER_TOKENS]) if ids else (choice.text or "")[:64]
        answers.append(answer)
        hits += correct(answer, gold)
        completion += reply.usage.completion_tokens
    preemptions = metric(final, "vllm:num_preemptions_total")
    given = takes_budget(method)
    return {"method": method, "budget": budget if given and budget_tokens is None else None,
            "budget_tokens": budget_tokens if given else None, "requests": len(prompts),
            "max_running": int(watch.max_running), "max_waiting": int(watch.max_waiting),
            "peak_kv_usage": watch.max_usage, "preemptions": None if preemptions is None else int(preemptions),
            "completion_tokens": completion, "prompt_tokens": sum(r.usage.prompt_tokens for r in replies),
            "wall_s": wall, "output_tok_s": completion / wall, "needle_hits": hits,
            "needle": f"{hits}/{len(prompts)}", "answers": answers, "golds": [gold for _, gold in prompts],
            "first_tokens": firsts,
            "mean_queue_s": histogram_mean(final, "vllm:request_queue_time_seconds"),
            "mean_prefill_s": histogram_mean(final, "vllm:request_prefill_time_seconds"),
            "mean_decode_s": histogram_mean(final, "vllm:request_decode_time_seconds"),
            "mean_ttft_s": histogram_mean(final, "vllm:time_to_first_token_seconds"),
            "startup_s": startup, "server_exit": proc.returncode, "scrapes": watch.scrapes,
            "scrape_errors": watch.errors,
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
            "log": str(log_path), "timeline": watch.timeline}


def mean_running(timeline: list[list[float]]) -> float | None:
    """Requests running, averaged over the timeline's samples (about one a second) while any request was running
    or waiting: how many a pool serves at once over a whole run. The peak alone flatters vanilla, whose requests
    are shortest (their prompts alone) just when they start together."""
    busy = [running for _, running, waiting, *_ in timeline if running + waiting > 0]
    return sum(busy) / len(busy) if busy else None


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's max and mean running and output tok/s over vanilla's (``full``), and how many of its replies
    begin with vanilla's first :data:`DRIFT_TOKENS` tokens, when vanilla ran."""
    base = next((r for r in rows if not takes_budget(r["method"])), None)
    for r in rows:
        r["mean_running"] = mean_running(r.get("timeline", []))
    for r in rows:
        ok = base is not None and base["max_running"] > 0
        r["concurrency_vs_vanilla"] = r["max_running"] / base["max_running"] if ok else None
        mean_ok = base is not None and base["mean_running"] and r["mean_running"] is not None
        r["mean_running_vs_vanilla"] = r["mean_running"] / base["mean_running"] if mean_ok else None
        r["throughput_vs_vanilla"] = r["output_tok_s"] / base["output_tok_s"] if base is not None else None
        same = None
        if base is not None and "first_tokens" in r and "first_tokens" in base:
            same = sum(a == b and len(a) > 0 for a, b in zip(r["first_tokens"], base["first_tokens"], strict=True))
        r["same_first_as_vanilla"] = same
    return rows


def saved_row(path: Path, key: dict[str, Any], measure: Any) -> dict[str, Any]:
    """The row saved at ``path`` by an earlier run with the same options (``key``), else ``measure()``, saved
    there whole (written aside, then renamed), so a long run over many methods resumes where it stopped."""
    import json

    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"{saved['row']['method']}: the row measured {saved['saved']} ({path})", file=sys.stderr)
            return saved["row"]
    row = measure()
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"key": key, "saved": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "row": row}))
    part.replace(path)
    return row


def run(directory: Path, model: str, served_name: str, context: int, requests: int, new_tokens: int,
        budget: float, kv_blocks: int, max_model_len: int, kv_cache_gib: int, dtype: str = "bfloat16",
        methods: tuple[str, ...] = METHODS, log_dir: Path | None = None, seed: int = 0,
        groups: dict[str, int] | None = None, budget_tokens: int | None = None) -> dict[str, Any]:
    """Every method, one server each, one after the other; the result holds the options, the pool and the rows.
    ``groups``: a method's KV-cache groups where it keeps one per layer (see :func:`run_method`);
    ``budget_tokens``: the methods' budget in tokens per KV head instead of the fraction ``budget``."""
    import json

    from transformers import AutoTokenizer

    config = json.loads((directory / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    built = build_prompts(tokenizer, [(context, requests)], context + new_tokens, new_tokens, seed=seed,
                          needle_at=min(NEEDLE_AT, context // 2))
    prompts = [built[(context, i)] for i in range(requests)]
    log_dir = Path(tempfile.mkdtemp(prefix="kvlab-bench-throughput-")) if log_dir is None else log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows = []
    for m in methods:
        key = {"model": served_name, "dtype": dtype, "context": context, "requests": requests,
               "new_tokens": new_tokens, "budget": budget, "budget_tokens": budget_tokens, "kv_blocks": kv_blocks,
               "max_model_len": max_model_len, "kv_cache_gib": kv_cache_gib, "seed": seed,
               "groups": (groups or {}).get(m, 1)}
        rows.append(saved_row(log_dir / f"row-{m}.json", key, lambda m=m, key=key: run_method(
            m, model, served_name, tokenizer, prompts, budget, new_tokens, max_model_len, kv_blocks, kv_cache_gib,
            dtype, log_dir, key["groups"], budget_tokens)))
    bytes_per_page = block_bytes(config, dtype)
    return {"model": served_name, "dtype": dtype, "machine": describe(), "cpu_count": os.cpu_count(),
            "vllm": vllm_version(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "options": {"context": context, "requests": requests, "new_tokens": new_tokens,
                        "budget": budget if budget_tokens is None else None, "budget_tokens": budget_tokens,
                        "kv_blocks": kv_blocks, "max_model_len": max_model_len, "kv_cache_gib": kv_cache_gib,
                        "seed": seed, "methods": list(methods)},
            "pool": {"pages": kv_blocks, "page_tokens": PAGE, "tokens": kv_blocks * PAGE,
                     "bytes_per_page": bytes_per_page, "mib": kv_blocks * bytes_per_page / 2**20,
                     "pages_per_request": pages(context + new_tokens),
                     "vanilla_requests_it_holds": (kv_blocks - 1) // pages(context + new_tokens)},
            "prompt_tokens": len(prompts[0][0]), "log_dir": str(log_dir), "rows": add_ratios(rows)}


# ---------------------------------------------------------------- the table
def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    def budget(r: dict[str, Any]) -> Any:
        return f"{r['budget_tokens']} tokens" if r.get("budget_tokens") else "-" if r["budget"] is None else r["budget"]

    return [{"method": r["method"], "budget": budget(r),
             "max running": r["max_running"],
             "mean running": "-" if r.get("mean_running") is None else round(r["mean_running"], 2),
             "peak KV usage %": round(100 * r["peak_kv_usage"], 1),
             "preemptions": "-" if r["preemptions"] is None else r["preemptions"],
             "output tok/s": round(r["output_tok_s"], 2),
             "concurrency vs vanilla": _ratio(r["concurrency_vs_vanilla"]),
             "mean running vs vanilla": _ratio(r.get("mean_running_vs_vanilla")),
             "throughput vs vanilla": _ratio(r["throughput_vs_vanilla"]),
             "needle": r["needle"],
             f"first {DRIFT_TOKENS} = vanilla": "-" if r.get("same_first_as_vanilla") is None
             else f"{r['same_first_as_vanilla']}/{r['requests']}",
             "wall s": round(r["wall_s"], 1)} for r in result["rows"]]


def title(result: dict[str, Any]) -> str:
    o, pool = result["options"], result["pool"]
    return (f"vLLM {result['vllm']} throughput · {result['model']} {result['dtype']} · {o['requests']} requests of "
            f"{result['prompt_tokens']} prompt + {o['new_tokens']} new tokens at once · pool {pool['pages']} pages "
            f"of {pool['page_tokens']} ({pool['mib']:.0f} MiB, {pool['vanilla_requests_it_holds']} vanilla "
            f"requests) · {result['machine']}")
