"""Package attributes imported on first use (PEP 562), so that importing one light submodule
(a CLI's option defaults, say) does not pull torch in through the package's __init__."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], Callable]:
    """`__getattr__` and `__dir__` for `package`; `exports` maps ".submodule" -> the names it gives."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
