"""``full``: the uncompressed cache, the reference every method is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvlab.methods.base import Method, register


@register
@dataclass
class Full(Method):
    """Keep and read every token."""

    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "uncompressed cache (reference)"
    family: ClassVar[str] = "reference"
    compresses: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # Any budget or ratio given to "full" must mean "keep everything".
        if self.keep_fraction != 1.0 or self.budget_tokens is not None:
            from kvlab.errors import KVLabError

            raise KVLabError("method 'full' keeps the whole cache: leave budget and ratio unset (or budget=1)")
