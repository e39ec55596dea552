"""RULER's ``--engine vllm``: one ``kvlab serve`` per (method, ratio) on 127.0.0.1, asked by lm-eval's own
``local-completions`` client (:class:`lm_eval.models.openai_completions.LocalCompletionsAPI`, a real OpenAI-style
HTTP client) with several requests in flight, on the samples :mod:`kvlab.experiments.ruler` saved.

A server answers the whole prompt (the question inside the compressed prompt: question-aware, as in serving).
It runs in float32 by default, as kvlab's own engine does, so that the two engines' answers can be compared
token for token (:func:`kvlab.experiments.ruler.agreement`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError
from kvlab.experiments.bench_vllm_throughput import free_port, served
from kvlab.experiments.ruler import Sample, cell_key, new_tokens, order, score
from kvlab.experiments.runner import Cells
from kvlab.progress import track

CONCURRENT = 2  # requests in flight per server


def serve_argv(model: str, method: str, ratio: float, port: int, max_model_len: int, dtype: str,
               params: list[str] = (), page_size: int | None = None) -> list[str]:
    """``python -m kvlab serve`` for one (method, ratio) with ``params`` (``-p NAME=VALUE``) on ``page_size``-token
    pages (``None``: the method's own); ``full`` is plain vLLM on kvlab serve's pages for it."""
    argv = [sys.executable, "-m", "kvlab", "serve", "--model", model, "--method", method]
    if method != "full":
        argv += ["--ratio", f"{ratio:g}", *[x for p in params for x in ("-p", p)]]
        argv += ["--block-size", str(page_size)] if page_size is not None else []
    return argv + ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
                   "--dtype", dtype]


def client(url: str, served_name: str, tokenizer_dir: str, max_length: int) -> Any:
    """lm-eval's ``local-completions`` model against ``url`` (the arguments lm-eval's command line takes)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(model=served_name, base_url=f"{url}/v1/completions", tokenizer=tokenizer_dir,
                               tokenized_requests=False, num_concurrent=CONCURRENT, max_retries=2,
                               max_length=max_length, timeout=900)


def ask(lm: Any, samples: list[Sample], max_new: int | None) -> list[str]:
    """Every sample through lm-eval's ``generate_until`` (greedy, no stop string but the end of text, at most the
    task's ``max_gen_toks`` or ``max_new`` tokens)."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="generate_until", doc=s.doc, idx=0,
                         arguments=(s.prompt, {"until": [], "max_gen_toks": new_tokens(s, max_new),
                                               "do_sample": False, "temperature": 0.0}))
                for s in samples]
    return list(lm.generate_until(requests, disable_tqdm=True))


def run_vllm(directory: str, served_name: str, samples: list[Sample], runs: list[tuple[str, float]], cells: Cells,
             length: int, max_new: int | None = None, dtype: str = "float32",
             log_dir: Path | None = None, params: list[str] = (), page_size: int | None = None,
             own_pages: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Every ``(method, ratio)`` of ``runs`` (``full`` at ratio 0): a server of the model in ``directory`` (whose
    tokenizer the client counts with), the samples not cached yet, the server stopped; each answer scored by
    lm-eval and written as its own cell, under the method's name, ``params`` and a page size other than the
    method's own (``own_pages``: kvlab serve's page size per method; ``block-route per_head=false page=64``): the
    label is the command line that reproduces it."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="kvlab-ruler-"))
    ordered = order(samples)
    max_len = max(length, 1024) + max(new_tokens(s, max_new) for s in samples) + 64
    out = []
    for method, ratio in track(runs, "RULER vllm"):
        own = (own_pages or {}).get(method)
        pages = [f"page={page_size}"] if page_size is not None and page_size != own else []
        label = " ".join([method, *params, *pages]) if method != "full" else method
        keys = [cell_key("vllm", served_name, s, label, ratio, "aware", length, new_tokens(s, max_new))
                for s in ordered]
        done = [cells.get("ruler", k) for k in keys]
        todo = [i for i, c in enumerate(done) if c is None]
        if todo:
            argv = serve_argv(directory, method, ratio, free_port(), max_len, dtype, params if method != "full" else (),
                              page_size)
            log = log_dir / f"serve-{label.replace(' ', '-').replace('=', '')}-{ratio:g}.log"
            with served(argv, log, method) as (url, _proc):
                lm = client(url, served_name, directory, max_len)
                try:
                    answers = ask(lm, [ordered[i] for i in todo], max_new)
                except Exception as exc:  # the server's reply, in one line
                    raise KVLabError(f"RULER through kvlab serve --method {method} failed: "
                                     f"{type(exc).__name__}: {exc}") from None
            for i, answer in zip(todo, answers, strict=True):
                done[i] = cells.put("ruler", keys[i], {**keys[i], "answer": answer, "score": score(ordered[i], answer),
                                                      "seconds": None})
        out += done
    return out
