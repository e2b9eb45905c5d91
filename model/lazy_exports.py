"""Package exports resolved on first use (PEP 562), so importing a package stays cheap.

`import model.config` (the planner) must not pay for torch, nor `import
platform.registry` for MLflow. It lives in `model` because `model` imports
nothing from `platform`, so both packages can share it.

    __getattr__, __dir__ = lazy_exports(__name__, {"DBRX": "model.dbrx", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, exporting each name from the module `exports` maps it to.

    A name is imported on first access and then kept in the package's
    namespace, so later lookups are plain attribute reads.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
