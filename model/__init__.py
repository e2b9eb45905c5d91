"""DBRX in PyTorch: `from model import DBRX, DBRXConfig`.

Exports are resolved lazily (PEP 562) so that `import model.config` or
`model.counting` (the planner, the config schema) never pays for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from model.config import DBRXConfig
    from model.dbrx import DBRX, DBRXOutput
    from model.decode import DecodeEngine, Sampling
    from model.generate import GenerationOutput
    from model.quant import quantize_model

_EXPORTS = {
    "DBRX": "model.dbrx",
    "DBRXOutput": "model.dbrx",
    "DBRXConfig": "model.config",
    "GenerationOutput": "model.generate",
    "DecodeEngine": "model.decode",
    "Sampling": "model.decode",
    "quantize_model": "model.quant",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
