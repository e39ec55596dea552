"""The command line's shared vocabulary: the options every command takes (one meaning everywhere: ``--budget``
the fraction kept or read, ``--ratio`` the fraction removed, ``--budget-tokens`` a count) and method parameters
given as ``-p NAME=VALUE`` or as options."""

from __future__ import annotations

import typing
from typing import Annotated, Any

import typer

from kvlab.errors import KVLabError, check

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="built-in name, random:<shape>, directory or HF id")]
BudgetOpt = Annotated[float | None, typer.Option(help="fraction of the context kept or read, in (0, 1]")]
RatioOpt = Annotated[float | None, typer.Option(help="fraction of the context removed, in [0, 1) (= 1 - budget)")]
BudgetTokensOpt = Annotated[int | None, typer.Option("--budget-tokens", help="budget as a token count")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="method parameter NAME=VALUE (repeat)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
CudaGraphsOpt = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs",
                                             help="on CUDA, replay decode steps from CUDA graphs (default on)")]


def parse_method_params(method: str, params: list[str] | None, **common: Any) -> dict[str, Any]:
    """``["window=64", ...]`` -> typed keyword arguments for ``method``, plus the common budget flags."""
    from kvlab.methods import METHODS

    if method not in METHODS:
        raise KVLabError(f"unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in cls.parameters()}
    out = {k: v for k, v in common.items() if v is not None}
    for item in params or []:
        check("=" in item, f"--param takes NAME=VALUE, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        check(name in fields, f"method {method!r} has no parameter {name!r}; allowed: {', '.join(sorted(fields))}")
        out[name] = _coerce(raw, hints.get(name, str), name)
    return out


def extra_method_params(args: list[str]) -> list[str]:
    """``["--rank", "32", "--mode=kv"]`` (options typer did not know) -> ``["rank=32", "mode=kv"]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        check(arg.startswith("--") and len(arg) > 2, f"unexpected argument {arg!r}")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
            continue
        check(i + 1 < len(args) and not args[i + 1].startswith("--"), f"option {arg} needs a value")
        out.append(f"{arg[2:]}={args[i + 1]}")
        i += 2
    return out


def _coerce(raw: str, hint: Any, name: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for kind in kinds:
        try:
            if kind is bool:
                check(raw.lower() in ("true", "false", "1", "0", "yes", "no"), f"{name} takes true or false")
                return raw.lower() in ("true", "1", "yes")
            if kind in (int, float, str):
                return kind(raw)
        except ValueError:
            continue
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise KVLabError(f"parameter {name}={raw!r} is not a valid {names}")
