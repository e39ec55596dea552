"""User-facing errors.

A :class:`KVLabError` carries one line that says what was wrong and what is allowed. The CLI prints
it without a traceback; library callers can catch it.
"""

from __future__ import annotations


class KVLabError(ValueError):
    """A mistake in what the user asked for (bad name, out-of-range parameter, missing file)."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`KVLabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise KVLabError(message)
