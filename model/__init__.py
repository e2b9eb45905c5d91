"""DBRX in PyTorch: `from model import DBRX, DBRXConfig`.

Exports are resolved lazily (PEP 562) so that `import model.config` or
`model.counting` (the planner, the config schema) never pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.config import DBRXConfig
    from model.dbrx import DBRX, DBRXOutput
    from model.generate import GenerationOutput

_EXPORTS = {
    "DBRX": "model.dbrx",
    "DBRXOutput": "model.dbrx",
    "DBRXConfig": "model.config",
    "GenerationOutput": "model.generate",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
