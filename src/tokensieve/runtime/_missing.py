"""The "no attribute of its own" marker the runtime's patches save and restore by."""

from __future__ import annotations

from typing import Any


class _Missing:
    """Marks "the instance had no attribute of its own" where a patch saved the previous value
    (one object, also through copies of a compressed model)."""

    def __repr__(self) -> str:
        return "<missing>"

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Missing":
        return self

    def __copy__(self) -> "_Missing":
        return self

    def __reduce__(self) -> str:
        return "MISSING"


MISSING = _Missing()
