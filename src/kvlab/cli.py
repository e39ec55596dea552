"""The ``kvlab`` command line: thin wrappers over the library.

Sub-commands live in ``kvlab.commands.*`` modules; each defines ``register(app)`` and is listed in
:data:`COMMAND_MODULES`. A :class:`~kvlab.errors.KVLabError` is printed as one line, no traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from kvlab.errors import KVLabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kvlab: KV-cache compression for LLM inference, and the experiments that test it.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print tables (speed, memory).")
app.add_typer(bench_app, name="bench")

COMMAND_MODULES = [
    "kvlab.commands.core",
    "kvlab.commands.eviction",
    "kvlab.commands.memory",
    "kvlab.commands.routing",
    "kvlab.commands.experiments",
    "kvlab.commands.kernels",
    "kvlab.commands.serve",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app, bench_app)


def main() -> None:
    try:
        app()
    except KVLabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
