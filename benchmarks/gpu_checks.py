"""Correctness of the model path on a CUDA GPU (run by ``benchmarks/gpu_run.sh``; needs CUDA).

1. With nothing compressed, kvlab (decode steps through the Triton kernels) reproduces transformers'
   logits and greedy tokens on tiny random models of every supported architecture, fp32 and bf16.
2. Every routing and eviction method at full budget decodes the same greedy tokens as ``full``.
3. ``block-route`` at 1/4 budget gives the same logits through the Triton kernels (the fused scoring
   + top-k kernel and the paged attention kernel) as through the torch path.
4. Decode steps replayed from CUDA graphs give the same tokens and logits as eager steps, for every
   method that captures its steps (full, block-route, streaming, h2o, tova, kv-compress, cluster-route,
   snapkv).
5. Every method at budget 1/2 runs on the GPU and decodes what it decodes on the CPU (fp32; logits
   within 1e-2: CPU and GPU arithmetic differ in rounding, which can move a near-tie in a selection).

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

import kvlab
from kvlab.generation import decode, prefill
from kvlab.methods import by_family, make_method
from kvlab.models.reference import transformers_greedy

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3"]
TOL = {torch.float32: 1e-3, torch.bfloat16: 0.15}  # max |Δlogit|; logits of these models are O(1)
failures: list[str] = []
FAMILY = {cls.name: cls.family for cls in by_family()}
ROUTING = [name for name, family in FAMILY.items() if family == "routing"]
EVICTION = [name for name, family in FAMILY.items() if family == "eviction"]


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


@contextlib.contextmanager
def kernels(backend: str) -> Iterator[None]:
    """Every kernel through ``backend`` (``triton`` or ``torch``) for the block (KVLAB_KERNELS)."""
    saved = os.environ.get("KVLAB_KERNELS")
    os.environ["KVLAB_KERNELS"] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KVLAB_KERNELS", None)
        else:
            os.environ["KVLAB_KERNELS"] = saved


GRAPH_METHODS = [("full", {}), ("block-route", {"budget": 0.25, "dense_layers": 0}),
                 ("block-route", {"budget": 0.25, "dense_layers": 0, "refresh": 3}),
                 ("streaming", {"budget": 0.25, "compact_every": 5}), ("h2o", {"budget": 0.25, "window": 8}),
                 ("tova", {"budget": 0.25}), ("kv-compress", {"budget": 0.25}),
                 ("cluster-route", {"budget": 0.25, "dense_layers": 0}),
                 ("snapkv", {"budget": 0.25, "window": 8})]


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 250, (n,), generator=g).tolist() for n in lengths]


def main(graphs_only: bool = False) -> int:
    """All checks; ``graphs_only`` (``--graphs``): checks 3 and 4 on tiny-llama alone (a minute)."""
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    ids = prompts((300, 211))
    for arch in ARCHS[:1] if graphs_only else ARCHS:
        for dtype in (torch.float32,) if graphs_only else (torch.float32, torch.bfloat16):
            model, _ = kvlab.load(f"random:{arch}", dtype=dtype)
            model = model.to(device)
            ref_tokens, ref_logits = transformers_greedy(model, ids, 12)
            snap = prefill(model, ids, block_size=16, reserve_tokens=4, observe=8)
            out = decode(model, snap, make_method("full"), max_new_tokens=12, return_logits=True)
            same = torch.equal(out.tokens.cpu(), ref_tokens.cpu())
            # bf16 rounding can flip a near-tie; from then on the two decode different text, so logits are
            # compared up to and including the first step whose greedy tokens differ
            agree = (out.tokens.cpu() == ref_tokens.cpu()).all(0).long().cumprod(0)
            steps = int(agree.sum()) + 1
            diff = (out.logits.float()[:, :steps] - ref_logits[:, :steps]).abs().max().item()
            report(f"{arch} {str(dtype)[6:]} full vs transformers", diff <= TOL[dtype] and
                   (same or dtype == torch.bfloat16),
                   f"max |Δlogit| {diff:.2e} over the first {min(steps, 12)} steps, tokens equal {same}")
            if dtype != torch.float32:
                continue
            full = out.tokens.cpu()
            for name in () if graphs_only else ROUTING + EVICTION:
                try:
                    extra = {"dense_layers": 0} if name in ROUTING else {}
                    res = decode(model, snap, make_method(name, budget=1.0, **extra), max_new_tokens=12)
                    eq = torch.equal(res.tokens.cpu(), full)
                    report(f"{arch} {name} at budget 1.0", eq, "same greedy tokens as full" if eq else
                           f"tokens differ: {res.tokens.cpu().tolist()} vs {full.tolist()}")
                except Exception as exc:  # noqa: BLE001 -- a method that cannot run at full budget: reported
                    report(f"{arch} {name} at budget 1.0", False, f"{type(exc).__name__}: {exc}")
            if arch == "tiny-gemma3":
                continue
            results = {}
            for backend in ("triton", "torch"):
                with kernels(backend):
                    results[backend] = decode(model, snap, make_method("block-route", budget=0.25, dense_layers=0),
                                              max_new_tokens=12, return_logits=True, cuda_graphs=False)
            diff = (results["triton"].logits - results["torch"].logits).abs().max().item()
            report(f"{arch} block-route 1/4: Triton vs torch path", diff <= 1e-3, f"max |Δlogit| {diff:.2e}")
            for name, params in GRAPH_METHODS:
                try:
                    runs = [decode(model, snap, make_method(name, **params), max_new_tokens=24, return_logits=True,
                                   cuda_graphs=graphs) for graphs in (False, True)]
                    diff = (runs[0].logits - runs[1].logits).abs().max().item()
                    ok = torch.equal(runs[0].tokens, runs[1].tokens) and diff <= 1e-4 and runs[1].replays > 0
                    report(f"{arch} {name} {params}: CUDA graphs vs eager", ok,
                           f"max |Δlogit| {diff:.2e}, {runs[1].graphs} graphs, {runs[1].replays} of "
                           f"{runs[1].steps} steps replayed")
                except Exception as exc:  # noqa: BLE001 -- reported, the rest go on
                    report(f"{arch} {name} {params}: CUDA graphs vs eager", False, f"{type(exc).__name__}: {exc}")
            del model, snap
            torch.cuda.empty_cache()
    if graphs_only:
        print(f"{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""), flush=True)
        return 1 if failures else 0
    cpu_model, _ = kvlab.load("random:tiny-llama")
    gpu_model = kvlab.load("random:tiny-llama")[0].to(device)
    cpu_snap = prefill(cpu_model, ids, block_size=16, reserve_tokens=4, observe=8)
    gpu_snap = prefill(gpu_model, ids, block_size=16, reserve_tokens=4, observe=8)
    for name in [n for n in FAMILY if n not in ("full", "kv-compress-w32")]:  # the w32 preset needs 32 observed
        params = {"budget": 0.5}
        if name in ("snapkv", "pyramidkv", "ada-snapkv", "h2o"):
            params["window"] = 8
        if name in ("quantize", "local-global", "cross-layer", "low-rank"):  # set by their own parameters
            params = {"low-rank": {"rank": 8}, "local-global": {"window": 64}}.get(name, {})
        try:
            a = decode(cpu_model, cpu_snap, make_method(name, **params), max_new_tokens=8, return_logits=True)
            b = decode(gpu_model, gpu_snap, make_method(name, **params), max_new_tokens=8, return_logits=True)
            diff = (a.logits - b.logits.cpu()).abs().max().item()
            report(f"tiny-llama {name} at 1/2: GPU vs CPU", diff <= 1e-2, f"max |Δlogit| {diff:.2e}, tokens equal "
                   f"{torch.equal(a.tokens, b.tokens.cpu())}")
        except Exception as exc:  # noqa: BLE001 -- a method that fails on the GPU: reported, the rest go on
            report(f"tiny-llama {name} at 1/2: GPU vs CPU", False, f"{type(exc).__name__}: {str(exc)[:300]}")
    print(f"{len(failures)} failed" + (": " + ", ".join(failures) if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(graphs_only="--graphs" in sys.argv[1:]))
