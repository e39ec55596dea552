"""kvlab's own engine on the prompts of ``kvlab bench vllm``: which pass keys block-route finds at a budget, for
each block size, so vLLM's needle column has kvlab's beside it (the same prompts, keys and 8-token answers).

Each prompt is prefilled once (float32, 16-token store blocks) and decoded from that snapshot with every method
given. On 2 cores a 16K prompt's prefill takes 7-10 minutes. Run under .venv:

    python benchmarks/bench_vllm_needles_in_kvlab.py [--model qwen2.5-coder-0.5b] [--context 16384] [--batch 4]
        [--budget 0.125] [--blocks 16,32,128] [--prompts 0,1]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--blocks", default="16,32,128", help="block-route block sizes (powers of two)")
    ap.add_argument("--prompts", default=None, help="which of the batch's prompts, e.g. 0,1 (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget is the fraction read, in (0, 1]; got {args.budget}")
    from transformers import AutoTokenizer

    import kvlab
    from kvlab.experiments.bench_vllm import ANSWER_TOKENS, build_prompts
    from kvlab.experiments.niah import correct
    from kvlab.generation import decode, prefill
    from kvlab.machine import describe
    from kvlab.methods import make_method
    from kvlab.models.builtin import BUILTIN_MODELS, ensure_converted

    if args.model not in BUILTIN_MODELS:
        raise SystemExit(f"--model must be a built-in model ({', '.join(BUILTIN_MODELS)}), got {args.model!r}")
    directory = ensure_converted(BUILTIN_MODELS[args.model])
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model, _ = kvlab.load(str(directory), dtype="float32")
    max_len = int(json.loads((directory / "config.json").read_text()).get("max_position_embeddings", 32768))
    prompts = build_prompts(tokenizer, [(args.context, args.batch)], max_len, 32)
    specs = [("full", {})] + [("block-route", {"budget": args.budget, "block_size": b, "score": score,
                                               "score_block": min(b, 16)})
                              for b in (int(x) for x in args.blocks.split(",")) for score in ("centroid", "bound")]
    chosen = range(args.batch) if args.prompts is None else [int(i) for i in args.prompts.split(",")]
    if any(not 0 <= i < args.batch for i in chosen):
        raise SystemExit(f"--prompts takes indices in 0..{args.batch - 1}, got {args.prompts}")
    rows = []
    for i in chosen:
        ids, gold = prompts[(args.context, i)]
        start = time.perf_counter()
        snapshot = prefill(model, [ids], block_size=16, reserve_tokens=ANSWER_TOKENS + 8)
        print(f"prompt {i}: {len(ids)} tokens, key {gold}, prefill {time.perf_counter() - start:.0f} s", flush=True)
        for name, params in specs:
            tokens = decode(model, snapshot, make_method(name, **params), max_new_tokens=ANSWER_TOKENS).tokens[0]
            answer = tokenizer.decode(tokens.tolist())
            rows.append({"prompt": i, "key": gold, "method": name, **params, "found": correct(answer, gold),
                         "answer": answer})
            print(f"  {name} {params}: {'found' if rows[-1]['found'] else 'missed'} {answer!r}", flush=True)
    result = {"model": args.model, "context": args.context, "machine": describe(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    for name, params in specs:
        found = sum(r["found"] for r in rows if r["method"] == name and all(r.get(k) == v for k, v in params.items()))
        print(f"{name} {params}: {found} of {len(chosen)}")


if __name__ == "__main__":
    main()
