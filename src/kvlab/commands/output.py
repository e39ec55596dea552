"""Printing results: rich tables for people, ``--json`` for programs.

Identifiers (the first column, and columns named like ``model`` or ``method``) never wrap: a
``grep`` for a name must find it whole. When stdout is not a terminal (a pipe, a file), a table is
printed at its natural width instead of being squeezed into 80 columns.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

IDENTIFIER_COLUMNS = {"model", "method", "name", "label", "experiment", "backend", "kernel", "shape", "kind"}
PIPE_WIDTH = 100_000  # wide enough for any table; rich sizes a non-expanding table to its content


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, columns: Sequence[str] | None = None,
                as_json: bool = False) -> None:
    """Print ``rows`` (dicts with the same keys) as a table, or as JSON with ``as_json``."""
    if as_json:
        print(json.dumps(list(rows), indent=2, default=str))
        return
    console = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH, soft_wrap=False)
    console.print(build_table(rows, title, columns))


def emit_result(result: dict[str, Any], rows: Sequence[dict[str, Any]], title: str, out: Path | None = None,
                as_json: bool = False) -> None:
    """A benchmark's end: the whole ``result`` written to ``out`` (atomically, when given), then printed as
    JSON with ``as_json``, else its ``rows`` as a table."""
    if out is not None:
        from kvlab.io import write_atomic

        write_atomic(out, json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(rows, title=title)


def build_table(rows: Sequence[dict[str, Any]], title: str | None = None,
                columns: Sequence[str] | None = None) -> Table:
    """The rich table for ``rows``: identifier columns are as wide as their longest cell and never wrap."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    table = Table(title=title)
    for i, c in enumerate(columns):
        if i == 0 or c.lower() in IDENTIFIER_COLUMNS:
            longest = max([len(c)] + [len(r[i]) for r in cells])
            table.add_column(c, no_wrap=True, min_width=longest)
        else:
            table.add_column(c, overflow="fold")
    for r in cells:
        table.add_row(*r)
    return table


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
