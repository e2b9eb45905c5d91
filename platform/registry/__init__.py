"""Model versions: what a promoted checkpoint is, where it lives, how it is found.

A committed training checkpoint becomes a version of a named model in the
MLflow Model Registry (`promote`); serving finds a version by alias or number
and loads it (`ModelRegistry`, `load_version`). The on-disk layout of a
version is in `platform.registry.artifacts`.

Importing this package does not import torch or MLflow.
"""

from __future__ import annotations

from model.lazy_exports import lazy_exports

_EXPORTS = {
    "RegistryError": "platform.registry.models",
    "ModelRegistry": "platform.registry.models",
    "VersionRef": "platform.registry.models",
    "load_version": "platform.registry.artifacts",
    "write_version": "platform.registry.artifacts",
    "model_from_state_dict": "platform.registry.artifacts",
    "GateRefused": "platform.registry.promotion",
    "Promotion": "platform.registry.promotion",
    "promote": "platform.registry.promotion",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
