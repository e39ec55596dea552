"""Host time and sync-forcing calls per decode step (the table of ``kvlab bench decode --host``), for this
checkout or for another one: ``--tree DIR`` imports kvlab from ``DIR/src`` (e.g. a ``git worktree`` of an
older commit) while the measurement itself is this checkout's :mod:`kvlab.experiments.bench_decode`, so
"before" and "after" are measured the same way.

    python benchmarks/decode_host_time.py [--tree DIR] [--layers 2,16] [--context 1024] [--steps 32] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=HERE, help="the kvlab checkout whose decode is measured")
    ap.add_argument("--layers", default="2,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve() / "src"))
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("bench_decode_here", HERE / "src/kvlab/experiments/bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import kvlab
    from kvlab.machine import describe

    rows = bench.host_time(tuple(int(x) for x in args.layers.split(",")), args.context, args.batch, args.steps,
                           args.rounds)
    result = {"tree": str(args.tree), "kvlab": str(Path(kvlab.__file__).parent), "machine": describe(),
              "context": args.context, "batch": args.batch, "steps": args.steps, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"kvlab from {result['kvlab']} · {result['machine']} · context {args.context} × {args.batch}")
    for r in rows:
        syncs = "-" if r["syncs/step"] is None else f"{r['syncs/step']:.1f}"
        print(f"  {r['layers']:>3} layers  {r['method']:<26} {r['ms/step']:8.2f} ms/step  "
              f"{r['ms/step/layer']:6.3f} ms/step/layer  {syncs:>7} syncs/step")


if __name__ == "__main__":
    main()
