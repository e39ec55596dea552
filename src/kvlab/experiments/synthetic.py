"""Routing physics (``kvlab eval synthetic``): compression as a perturbation of attention routing.

Following arXiv 2603.01426, which finds a hallucination cliff near 90% compression that tracks the
Global Eviction Ratio (GER: the fraction of answer-relevant tokens that *no* head of a layer keeps),
template tasks generated from a seed, with facts interleaved in real prose:

- ``tracking``: objects moved between rooms; where is X at the end / what ends in room R;
- ``instance``: one person mentioned many times (a city per day); which city on day D / which day in city C;
- ``coref``: gifts told with pronouns ("She gave him a blue scarf"), plus unanswerable questions whose gold
  answer is "I don't know";
- ``multihop``: chains of "X's mentor is Y" of 2–4 hops with distractor chains.

Every task is asked in both directions (subject→attribute ``s2a`` and attribute→subject ``a2s``).
Per method and compression ratio: token F1, the hallucination rate (a confident -- not abstaining --
wrong answer where the gold is "I don't know" or the fact was evicted), GER per layer and head
consensus per layer, and where each method's cliff is.

``kvlab eval synthetic`` prints :func:`summarize_cells` of :func:`run_cells`; ``kvlab validate`` runs
:func:`run` (and the consensus model on the same questions) and reports :func:`summarize`.
"""

from __future__ import annotations

import random
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.experiments import metrics
from kvlab.experiments.runner import (
    Cells,
    MethodSpec,
    resolve,
    run_method,
)
from kvlab.experiments.study import Config, Study
from kvlab.experiments.texts import Prompt, build_prompt, encode, text_tokens
from kvlab.generation import decode_texts, eos_ids, prefill
from kvlab.progress import track

TASKS = ("tracking", "instance", "coref", "multihop")
INSTRUCTION = ('Answer the question using only the text above. Reply with just the answer (one word or name). '
               'If the text does not say, reply "I don\'t know".')
FEMALE = ["Alice", "Chiara", "Elena", "Greta", "Ingrid", "Katya", "Mei", "Olga", "Rosa", "Yara"]
MALE = ["Bruno", "Dmitri", "Farid", "Hiro", "Jamal", "Lars", "Nikos", "Pavel", "Sven", "Tariq"]
OBJECTS = ["key", "coin", "ring", "map", "lamp", "book", "watch", "shell", "stone", "badge"]
ROOMS = ["kitchen", "garden", "attic", "cellar", "garage", "library", "hallway", "studio", "balcony", "bedroom"]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Dublin", "Quito", "Riga", "Tunis", "Perth"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "brown"]
ITEMS = ["umbrella", "scarf", "hat", "lantern", "notebook", "kettle", "basket", "compass"]


def _tracking(rng: random.Random, direction: str) -> tuple[list[str], list[int], str, str]:
    objs = rng.sample(OBJECTS, 4)
    rooms = rng.sample(ROOMS, 8)
    where = dict(zip(objs, rooms[:4], strict=False))
    facts, last = [], {}
    for o in objs:
        last[o] = len(facts)
        facts.append(f"The {o} is in the {where[o]}.")
    for _ in range(5):
        o = rng.choice(objs)
        free = [r for r in rooms if r not in where.values()]
        new = rng.choice(free)
        last[o] = len(facts)
        facts.append(f"Later, the {o} is moved from the {where[o]} to the {new}.")
        where[o] = new
    target = rng.choice(objs)
    if direction == "s2a":
        return facts, [last[target]], f"In which room is the {target} at the end?", where[target]
    return facts, [last[target]], f"Which object is in the {where[target]} at the end?", target


def _instance(rng: random.Random, direction: str) -> tuple[list[str], list[int], str, str]:
    person = "Dr. " + rng.choice(FEMALE + MALE)
    days, cities = rng.sample(DAYS, 5), rng.sample(CITIES, 5)
    facts = [f"On {d}, {person} visited {c}." for d, c in zip(days, cities, strict=False)]
    i = rng.randrange(5)
    if direction == "s2a":
        return facts, [i], f"Which city did {person} visit on {days[i]}?", cities[i]
    return facts, [i], f"On which day did {person} visit {cities[i]}?", days[i]


def _coref(rng: random.Random, direction: str, answerable: bool) -> tuple[list[str], list[int], str, str]:
    givers, takers = rng.sample(FEMALE, 3), rng.sample(MALE, 3)
    colors, items = rng.sample(COLORS, 4), rng.sample(ITEMS, 3)
    facts = [f"{g} met {t} at the market. She gave him a {c} {it}."
             for g, t, c, it in zip(givers, takers, colors, items, strict=False)]
    i = rng.randrange(3)
    if answerable:
        if direction == "s2a":
            return facts, [i], f"What color was the {items[i]} that {givers[i]} gave {takers[i]}?", colors[i]
        return facts, [i], f"Who gave {takers[i]} the {colors[i]} {items[i]}?", givers[i]
    if direction == "s2a":  # a giver who is never mentioned
        absent = rng.choice([n for n in FEMALE if n not in givers])
        return facts, [], f"What color was the {items[i]} that {absent} gave {takers[i]}?", metrics.ABSTAIN
    return facts, [], f"Who gave {takers[i]} the {colors[3]} {items[i]}?", metrics.ABSTAIN  # colors[3] never given


def _multihop(rng: random.Random, direction: str, hops: int) -> tuple[list[str], list[int], str, str]:
    people = rng.sample(FEMALE + MALE, 2 * (hops + 1))
    chain, other = people[:hops + 1], people[hops + 1:]
    facts = [f"{a}'s mentor is {b}." for a, b in zip(chain, chain[1:], strict=False)]
    distract = [f"{a}'s mentor is {b}." for a, b in zip(other, other[1:], strict=False)]
    order = list(range(len(facts) + len(distract)))
    rng.shuffle(order)
    all_facts = [(facts + distract)[j] for j in order]
    relevant = [order.index(j) for j in range(len(facts))]
    path = " of the mentor" * (hops - 1)
    if direction == "s2a":
        return all_facts, relevant, f"Who is the mentor{path} of {chain[0]}?", chain[-1]
    whose = "Whose" + " mentor's" * (hops - 1)
    return all_facts, relevant, f"{whose} mentor is {chain[-1]}?", chain[0]


def family_of(task: str, direction: str) -> str:
    """A task family: the template and the direction asked (``instance/s2a``)."""
    return f"{task}/{direction}"


def generate(tokenizer: Any, seed: int, length: int, n_per_task: int = 1, hops: tuple[int, ...] = (2, 3, 4),
             tasks: tuple[str, ...] = TASKS, focus: dict[str, int] | None = None) -> list[Prompt]:
    """Prompts of exactly ``length`` tokens: per task, ``n_per_task`` instances, both directions (coref
    also unanswerable in both directions, multihop for each hop count). Deterministic for a seed.

    ``focus`` (family -> instances, e.g. ``{"instance/s2a": 16}``) adds instances of the families a model
    can do: instance ``n`` of a variant exists when ``n < n_per_task`` or ``n < focus[family]``. Each
    instance's random draw depends only on (seed, task, n, variant), so a larger set extends a smaller
    one: the first ``n_per_task`` instances are the same questions at any focus.
    """
    focus = focus or {}
    bad = [f for f in focus if f.split("/")[0] not in TASKS or f.split("/")[-1] not in ("s2a", "a2s")]
    check(not bad, f"unknown task family {', '.join(bad)}; allowed: <{'|'.join(TASKS)}>/<s2a|a2s>")
    out = []
    filler = text_tokens(tokenizer, "prose", length * 2, seed)
    for task in tasks:
        most = max([n_per_task] + [v for f, v in focus.items() if f.split("/")[0] == task])
        for n in range(most):
            variants: list[tuple[str, dict[str, Any]]] = []
            if task == "coref":
                variants = [(d, {"answerable": a}) for a in (True, False) for d in ("s2a", "a2s")]
            elif task == "multihop":
                variants = [(d, {"hops": h}) for h in hops for d in ("s2a", "a2s")]
            else:
                variants = [(d, {}) for d in ("s2a", "a2s")]
            for direction, extra in variants:
                if n >= max(n_per_task, focus.get(family_of(task, direction), 0)):
                    continue
                rng = random.Random(f"{seed}-{task}-{n}-{direction}-{sorted(extra.items())}")
                if task == "tracking":
                    facts, rel, q, gold = _tracking(rng, direction)
                elif task == "instance":
                    facts, rel, q, gold = _instance(rng, direction)
                elif task == "coref":
                    facts, rel, q, gold = _coref(rng, direction, extra["answerable"])
                else:
                    facts, rel, q, gold = _multihop(rng, direction, extra["hops"])
                qid = f"{task}/{direction}/{n}" + "".join(f"/{k}={v}" for k, v in sorted(extra.items()))
                meta = {"task": task, "direction": direction, "answerable": gold != metrics.ABSTAIN, "qid": qid,
                        **extra}
                out.append(_assemble(tokenizer, facts, rel, q, gold, filler, length, rng, meta))
    return out


def _assemble(tokenizer: Any, facts: list[str], relevant: list[int], question: str, gold: str,
              filler: list[int], length: int, rng: random.Random, meta: dict[str, Any]) -> Prompt:
    fact_ids = [encode(tokenizer, "\n" + f + "\n") for f in facts]
    q = question + " " + INSTRUCTION
    probe = build_prompt(tokenizer, [(x, False) for x in fact_ids], q, gold)
    budget = length - len(probe.ids)
    if budget < len(facts) + 1:
        raise KVLabError(f"synthetic context of {length} tokens is too short (needs more than {len(probe.ids)})")
    # Split the filler into len(facts) + 1 gaps at sorted random cut points (sequential facts stay in order).
    cuts = sorted(rng.sample(range(1, budget), len(facts)))
    bounds = [0] + cuts + [budget]
    start = rng.randrange(0, len(filler) - budget)
    hay = filler[start:start + budget]
    segs: list[tuple[str | list[int], bool]] = []
    for i, ids in enumerate(fact_ids):
        segs.append((hay[bounds[i]:bounds[i + 1]], False))
        segs.append((ids, i in relevant))
    segs.append((hay[bounds[-2]:bounds[-1]], False))
    p = build_prompt(tokenizer, segs, q, gold, {**meta, "question": question, "facts": facts})
    assert len(p.ids) == length, (len(p.ids), length)
    return p


def context_text(tokenizer: Any, prompt: Prompt) -> str:
    return tokenizer.decode(prompt.ids[:prompt.context_end], skip_special_tokens=True)


def run_cells(model: Any, tokenizer: Any, model_name: str, specs: list[MethodSpec], ratios: list[float],
              length: int, cells: Cells, notes: list[str], seed: int = 0, n_per_task: int = 1,
              max_new_tokens: int = 8, focus: dict[str, int] | None = None, batch_size: int = 0,
              cuda_graphs: bool = True) -> list[dict[str, Any]]:
    """Every (method, ratio) cell over all generated prompts.

    The prompts are split into parts of at most ``batch_size`` (0: one part); each part is prefilled once
    and every (method, ratio) decodes from its snapshot, so memory is bounded by one part. Cells are cached
    per part; the returned cells hold every part's rows.
    """
    eos = eos_ids(tokenizer, model)
    prompts = generate(tokenizer, seed, length, n_per_task, focus=focus)
    size = batch_size or len(prompts)
    parts = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    plan = [(s, r) for s in specs for r in ([0.0] if s.budgetless else ratios)]
    merged: dict[tuple[str, float], dict[str, Any]] = {}
    todo = [(i, s, r) for i in range(len(parts)) for s, r in plan]
    snap, snap_part = None, None
    for i, s, ratio in track(todo, "synthetic tasks"):
        batch = parts[i]
        key = {"model": model_name, "method": s.label, "ratio": ratio, "length": length, "seed": seed,
               "n": n_per_task, "max_new": max_new_tokens, "focus": sorted((focus or {}).items()),
               "part": i, "parts": len(parts), "first": batch[0].meta["qid"]}
        cell = cells.get("synthetic", key)
        if cell is None:
            if snap_part != i:
                snap = None  # free the previous part's snapshot before the next prefill
                snap = prefill(model, [p.ids[:-1] for p in batch], chunk_size=1024, reserve_tokens=max_new_tokens + 1,
                               label=f"synthetic prefill {i + 1}/{len(parts)}")
                snap_part = i
            try:
                res = run_method(model, snap, s.make(1.0 - ratio), [p.ids[-1:] for p in batch], max_new_tokens, eos,
                                 record_reads=True, label=f"synthetic {s.label} r={ratio:g}", cuda_graphs=cuda_graphs)
            except Exception as exc:
                notes.append(f"synthetic: {s.label} at ratio {ratio:g} failed: {exc}")
                continue
            cell = cells.put("synthetic", key, {"model": model_name, "method": s.label, "ratio": ratio,
                                                "rows": _score(tokenizer, batch, res, eos),
                                                "decode_seconds": res.seconds})
        m = merged.setdefault((s.label, ratio), {"model": model_name, "method": s.label, "ratio": ratio, "rows": [],
                                                 "decode_seconds": 0.0, "parts": 0})
        m["rows"].extend(cell["rows"])
        m["decode_seconds"] += cell["decode_seconds"]
        m["parts"] += 1
    # a (method, ratio) counts only when every part ran: a partial one would bias its scores
    return [c for c in merged.values() if c["parts"] == len(parts)]


def _score(tokenizer: Any, batch: list[Prompt], res: Any, eos: Any) -> list[dict[str, Any]]:
    answers = decode_texts(tokenizer, res.generated, eos)
    rows = []
    layers = sorted(res.reads)
    for b, (p, a) in enumerate(zip(batch, answers, strict=True)):
        ans = metrics.first_answer(a)
        ger = [metrics.global_eviction_ratio(res.reads[i][b], p.relevant) for i in layers]
        cons = [metrics.head_consensus(res.reads[i][b]) for i in layers]
        rows.append({**{k: v for k, v in p.meta.items() if k not in ("facts",)}, "gold": p.gold,
                     "answer": ans, "f1": metrics.token_f1(ans, p.gold),
                     "abstained": metrics.is_abstention(ans), "ger_per_layer": ger,
                     "consensus_per_layer": cons})
    return rows


def hallucinated(row: dict[str, Any]) -> bool | None:
    """A confident wrong answer where the gold is "I don't know" or the fact was evicted (mean GER ≥ 0.5);
    None where the question is answerable and its fact survived (not a hallucination opportunity)."""
    ger = row["ger_per_layer"]
    evicted = row["answerable"] and bool(ger) and sum(ger) / len(ger) >= 0.5
    if row["answerable"] and not evicted:
        return None
    return (not row["abstained"]) and row["f1"] < 0.5


def correct(row: dict[str, Any]) -> bool:
    return row["f1"] >= metrics.CORRECT_F1


def summarize_cells(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (method, ratio): F1, accuracy conditional on the questions the full cache answers, hallucination
    rate, mean and worst-layer GER, GER and head consensus per layer. Per swept method: the cliff (the first
    ratio where conditional accuracy falls below half of the full cache's), the GER spike (the ratio where
    mean GER rises most steeply, per unit of ratio) and the correlation of GER with conditional accuracy over
    its ratios (ratio 0 is the full cache). Per task family: the full cache's accuracy, and which families
    it cannot do."""
    full_cell = next((c for c in cells if c["method"] == "full"), None)
    solved = {r["qid"] for r in full_cell["rows"] if correct(r)} if full_cell else set()
    rows = []
    for c in sorted(cells, key=lambda c: (c["method"], c["ratio"])):
        rs = c["rows"]
        ans = [r for r in rs if r["answerable"]]
        hall = [h for h in (hallucinated(r) for r in rs) if h is not None]
        n_layers = len(rs[0]["ger_per_layer"]) if rs else 0
        ger_layer = [sum(r["ger_per_layer"][i] for r in ans) / max(1, len(ans)) for i in range(n_layers)]
        cons_layer = [sum(r["consensus_per_layer"][i] for r in rs) / max(1, len(rs)) for i in range(n_layers)]
        by_task = {}
        for t in TASKS:
            for d in ("s2a", "a2s"):
                sel = [r["f1"] for r in rs if r["task"] == t and r["direction"] == d]
                if sel:
                    by_task[family_of(t, d)] = sum(sel) / len(sel)
        cond = metrics.conditional_accuracy({r["qid"]: correct(r) for r in rs}, solved)
        rows.append({"method": c["method"], "ratio": c["ratio"], "n": len(rs), "f1": sum(r["f1"] for r in rs) / len(rs),
                     "f1_answerable": sum(r["f1"] for r in ans) / max(1, len(ans)),
                     "accuracy": sum(map(correct, rs)) / len(rs), "cond_accuracy": cond,
                     "hallucination": sum(hall) / len(hall) if hall else 0.0, "n_hall_cases": len(hall),
                     "ger": sum(ger_layer) / max(1, n_layers), "max_layer_ger": max(ger_layer, default=0.0),
                     "ger_per_layer": ger_layer, "consensus_per_layer": cons_layer,
                     "consensus": sum(cons_layer) / max(1, n_layers), "by_task": by_task})
    full = next((r for r in rows if r["method"] == "full"), None)
    full_f1 = full["f1"] if full else None
    curves = {}
    for m in sorted({r["method"] for r in rows if r["ratio"] > 0}):  # methods swept over ratios (a cliff needs one)
        series = sorted((r for r in rows if r["method"] == m), key=lambda r: r["ratio"])
        if full is not None:  # ratio 0: every method at full budget is the full cache
            series = [full] + series
        x = [r["ratio"] for r in series]
        acc = [r["cond_accuracy"] for r in series]
        ok = [(g, a) for g, a in zip([r["ger"] for r in series], acc, strict=True) if a is not None]
        curves[m] = {"ratios": x, "cond_accuracy": acc, "ger": [r["ger"] for r in series],
                     "max_layer_ger": [r["max_layer_ger"] for r in series],
                     "hallucination": [r["hallucination"] for r in series],
                     "cliff": metrics.cliff(x, acc, 1.0) if solved else None,
                     "ger_spike": metrics.spike(x, [r["ger"] for r in series]),
                     "worst_layer_spike": metrics.spike(x, [r["max_layer_ger"] for r in series]),
                     "correlation": metrics.pearson([g for g, _ in ok], [a for _, a in ok])}
    families = {}
    if full_cell:
        for f in dict.fromkeys(family_of(r["task"], r["direction"]) for r in full_cell["rows"]):
            sel = [r for r in full_cell["rows"] if family_of(r["task"], r["direction"]) == f]
            n_ok = sum(map(correct, sel))
            families[f] = {"n": len(sel), "solved": n_ok, "accuracy": n_ok / len(sel)}
    cannot = [f for f, v in families.items() if v["accuracy"] < CAN_DO]
    parts = [f"full-cache F1 {full_f1:.2f}, {len(solved)} of {full['n']} questions answered" if full
             else "no full-cache baseline"]
    if families:
        parts.append("full cache by family: " + ", ".join(f"{f} {v['solved']}/{v['n']}" for f, v in families.items()))
    for m, c in curves.items():
        top = max(c["ratios"])
        corr = "n/a" if c["correlation"] is None else f"{c['correlation']:.2f}"
        cl = f"cliff at {c['cliff']:.0%}" if c["cliff"] is not None else f"no cliff up to {top:.0%}"
        spike = "-" if c["ger_spike"] is None else f"{c['ger_spike']:.0%}"
        parts.append(f"{m}: {cl}, GER spike at {spike}, corr(GER, cond. acc.) {corr}")
    return {"rows": rows, "full_f1": full_f1, "solved": len(solved), "families": families, "cannot": cannot,
            "curves": curves, "cliffs": {m: c["cliff"] for m, c in curves.items()}, "summary": "; ".join(parts)}


CAN_DO = 0.25  # a family the full cache answers less than a quarter of is one the model cannot do


def consensus_shape(per_layer: list[float], margin: float = 0.05) -> dict[str, Any]:
    """Where the heads of a layer agree: mean consensus over the first and the last third of the layers,
    and the shape: "early consensus" (agreement high early, then falling), "funnel" (late convergence:
    rising towards the last layers) or "flat" (within ``margin``)."""
    n = len(per_layer)
    k = max(1, n // 3)
    early, late = sum(per_layer[:k]) / k, sum(per_layer[-k:]) / k
    shape = "early consensus" if early > late + margin else ("funnel" if late > early + margin else "flat")
    return {"early": early, "late": late, "shape": shape}


def consensus_compare(models: dict[str, list[dict[str, Any]]], methods: list[str],
                      ratios: list[float]) -> dict[str, Any]:
    """Head consensus by layer per model on the same questions (the ids every model answered), per
    (method, ratio), and each profile's shape: "early consensus" or "funnel" (late convergence)."""
    qids = None
    for cells in models.values():
        ids = {r["qid"] for c in cells for r in c["rows"]}
        qids = ids if qids is None else qids & ids
    out: dict[str, Any] = {"models": {}, "questions": len(qids or ())}
    parts = []
    for name, cells in models.items():
        prof = {}
        for c in cells:
            if c["method"] in methods and c["ratio"] in ratios:
                rs = [r for r in c["rows"] if r["qid"] in (qids or ())]
                if rs:
                    n_layers = len(rs[0]["consensus_per_layer"])
                    per_layer = [sum(r["consensus_per_layer"][i] for r in rs) / len(rs) for i in range(n_layers)]
                    shape = consensus_shape(per_layer)
                    prof[f"{c['method']}@{c['ratio']:g}"] = {"per_layer": per_layer, **shape}
        out["models"][name] = prof
        shapes = [f"{k} {v['shape']} ({v['early']:.2f} → {v['late']:.2f})" for k, v in prof.items()]
        parts.append(f"{name}: " + ", ".join(shapes))
    out["summary"] = f"on {out['questions']} shared questions, first → last third of layers: " + "; ".join(parts)
    return out


# ----------------------------------------------------------------------------- kvlab validate
MIN_SOLVED = 30  # questions the full cache must answer before a cliff in conditional accuracy means anything
NEAR_90 = (0.85, 0.95)  # "a cliff near 90% compression" (arXiv 2603.01426)


def run(study: Study) -> dict[str, Any]:
    """The synthetic set of the config (in parts of ``synthetic_batch``, with the focused families) through
    ``synthetic_methods`` at every ratio; then, with a ``consensus_model``, that model on the base set (a model
    that cannot run here is noted and skipped)."""
    cfg = study.cfg
    cells = run_cells(study.model, study.tokenizer, study.model_name, study.methods(cfg.synthetic_methods),
                      cfg.synthetic_ratios, cfg.synthetic_length, study.cells, study.notes, cfg.seed,
                      cfg.synthetic_per_task, cfg.synthetic_new_tokens, cfg.synthetic_focus, cfg.synthetic_batch,
                      study.cuda_graphs)
    compare = None
    if cfg.consensus_model and cfg.consensus_methods:
        try:
            compare = consensus_run(study, cells)
        except KVLabError as exc:
            study.notes.append(f"consensus on {cfg.consensus_model} skipped: {exc}")
    return {"cells": cells, "consensus_compare": compare}


def consensus_run(study: Study, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The consensus model on the base synthetic set (the same questions: a shared tokenizer gives identical
    prompts) at ``consensus_ratios``, against the main model's cells on the same question ids."""
    import kvlab

    cfg, other = study.cfg, study.cfg.consensus_model
    assert other is not None
    m2, t2 = kvlab.load(other)
    specs2 = [s for s in resolve(cfg.consensus_methods, study.notes) if not s.budgetless]
    cells2 = run_cells(m2, t2, other, specs2, cfg.consensus_ratios, cfg.synthetic_length, study.cells, study.notes,
                       cfg.seed, cfg.synthetic_per_task, cfg.synthetic_new_tokens, None, cfg.synthetic_batch,
                       study.cuda_graphs)
    del m2
    return consensus_compare({study.model_name: cells, other: cells2}, cfg.consensus_methods, cfg.consensus_ratios)


def cliff_tracks_ger(curve: dict[str, Any]) -> bool:
    """A cliff tracks GER when GER and conditional accuracy correlate below -0.5 over the ratios and the
    GER spike is within one step of the swept grid of the cliff."""
    c, spike, x = curve["cliff"], curve["ger_spike"], curve["ratios"]
    if c is None or spike is None or curve["correlation"] is None:
        return False
    return curve["correlation"] < -0.5 and abs(x.index(spike) - x.index(c)) <= 1


def summarize(data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The routing-physics section: per method and ratio the table of :func:`summarize_cells`, where each
    swept method's cliff lies and whether it tracks a GER spike, and the verdict (judged only when the full
    cache answers :data:`MIN_SOLVED` questions)."""
    cells, consensus = data["cells"], data.get("consensus_compare")
    s = summarize_cells(cells)
    rows = [r for r in s["rows"] if r["method"] != "full"]
    corr = metrics.pearson([r["ger"] for r in rows], [r["f1"] for r in rows])
    top, low = max(cfg.synthetic_ratios), min(cfg.synthetic_ratios)
    h_top = metrics.mean([r["hallucination"] for r in rows if r["ratio"] == top])
    h_low = metrics.mean([r["hallucination"] for r in rows if r["ratio"] == low])
    curves = s["curves"]
    near = [m for m, c in curves.items() if c["cliff"] is not None and NEAR_90[0] <= c["cliff"] <= NEAR_90[1]]
    tracks = [m for m, c in curves.items() if cliff_tracks_ger(c)]
    n = max(1, len(curves))
    if s["solved"] < MIN_SOLVED or not curves:
        v = "inconclusive"  # too few questions the model can answer even with the full cache
        why = f"the full cache answers {s['solved']} questions, fewer than the {MIN_SOLVED} a cliff needs"
    elif len(near) >= 2 * n / 3 and len(tracks) >= 2 * n / 3:
        v, why = "supported", "most swept methods have their cliff near 90% and it tracks a GER spike"
    elif len(near) <= n / 3 or len(tracks) <= n / 3:
        v = "not supported"
        why = (f"the cliff sits near 90% for {len(near)}/{len(curves)} methods and tracks a GER spike for "
               f"{len(tracks)}/{len(curves)}")
    else:
        v, why = "inconclusive", "the methods disagree"
    text = (f"{why}; near 90%: {', '.join(near) or 'none'}; tracking GER: {', '.join(tracks) or 'none'}; "
            f"hallucination rate {h_low:.2f} at ratio {low:g} → {h_top:.2f} at {top:g}; correlation of mean GER with "
            f"F1 across all (method, ratio) cells {'n/a' if corr is None else f'{corr:.2f}'}; "
            + (f"families the model cannot do (full cache < {CAN_DO:.0%}): {', '.join(s['cannot'])}; "
               if s["cannot"] else "") + s["summary"])
    if consensus:
        text += "; head consensus by layer: " + consensus["summary"]
    return {"verdict": v, "summary": s, "cells": cells, "near_90": near, "tracks_ger": tracks,
            "consensus_compare": consensus, "measurement": _measurement(cfg), "text": text}


def _measurement(cfg: Config) -> str:
    focus = ", ".join(cfg.synthetic_focus) or "no family"
    return (f"Template tasks from a seed (tracking, instance disambiguation, coreference with unanswerable questions, "
            f"2–4-hop chains; both directions; {cfg.synthetic_per_task} instances per task plus more of {focus}) in "
            f"{cfg.synthetic_length}-token contexts of Gutenberg filler, ratios {cfg.synthetic_ratios}. Correct = "
            "token F1 ≥ 0.5; conditional accuracy = accuracy on the questions the full cache answers; the cliff = "
            "the first ratio where it falls below half of the full cache's. GER and head consensus are measured on "
            "what each (layer, KV head) reads at the step that produces the first answer token. Supported when, for "
            f"at least 2/3 of the swept methods, the cliff lies in {NEAR_90[0]:.0%}–{NEAR_90[1]:.0%} and tracks GER "
            "(correlation < -0.5 over the ratios, GER spike within one grid step); judged only when the full cache "
            f"answers at least {MIN_SOLVED} questions.")
