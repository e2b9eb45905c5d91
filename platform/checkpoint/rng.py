"""Random-number generator state as plain JSON, so checkpoints need no pickle.

A resumed run must draw the same dropout masks and data shuffles it would
have drawn without the interruption; each rank saves its own state (e.g.
`rng/rank_00003.json`) and restores it when the world size is unchanged.
"""

from __future__ import annotations

import base64
import random
from typing import Any

FORMAT_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (initialised) CUDA generator states."""
    import torch

    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "torch_cpu": _b64(torch.get_rng_state().numpy().tobytes()),
        "torch_cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only if this process has the same GPUs)."""
    import torch

    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown RNG state format {state.get('format_version')!r}")
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8))
    cuda = state.get("torch_cuda") or []
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            raise ValueError(f"RNG state has {len(cuda)} CUDA generators; this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in cuda]
        )
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        keys = np.asarray(n["keys"], dtype=np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
