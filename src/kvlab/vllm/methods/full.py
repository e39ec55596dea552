"""``full`` inside vLLM: vLLM as it is (the plugin hands vLLM its own attention classes)."""

from __future__ import annotations

from typing import Any

from kvlab.errors import check
from kvlab.methods.full import Full
from kvlab.vllm.methods.base import BUDGET_KEYS, Adapter, adapter


@adapter(Full)
class FullAdapter(Adapter):
    """Inert: no parameter acts inside vLLM."""

    @classmethod
    def params(cls, section: dict[str, Any], page_size: int) -> dict[str, Any]:
        extra = sorted(set(section) - set(BUDGET_KEYS))
        check(not extra, f"method {cls.serves.name!r} takes no parameter {', '.join(extra)}")
        return section
