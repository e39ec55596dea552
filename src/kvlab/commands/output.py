"""Printing results: rich tables for people, ``--json`` for programs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, columns: Sequence[str] | None = None,
                as_json: bool = False) -> None:
    """Print ``rows`` (dicts with the same keys) as a table, or as JSON with ``as_json``."""
    if as_json:
        print(json.dumps(list(rows), indent=2, default=str))
        return
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(row.get(c)) for c in columns))
    Console().print(table)


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
