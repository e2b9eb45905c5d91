"""Expert load at DBRX scale: two numbers per layer as metrics, the full matrix as artifacts.

One metric per layer per expert is 640 series for DBRX, ~1.8 billion rows in
MLflow's store over a 2.9M-step run, and a run page that opens on a wall of
expert charts before the loss. Each logged step therefore carries per-layer
summaries (`expert_load_summary`); rank 0 keeps the per-step matrix in
memory (plots.ExpertLoadHistory) and at each checkpoint the logger stores it
as `expert_load/step_<N>.png` (the heatmap) and `expert_load/step_<N>.parquet`
(`expert_load_table`: one row per step, layer and expert)::

    pandas.read_parquet("step_00000200.parquet").pivot_table(
        index="step", columns=["layer", "expert"], values="fraction")
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from platform.tracking.keys import CV, MAX_OVER_UNIFORM, expert_load_key
from platform.tracking.plots import load_history

TABLE_COLUMNS = ("step", "layer", "expert", "fraction")


def expert_load_summary(loads: Any) -> Dict[str, float]:
    """Per-layer metrics of one step's loads ([layers, experts], fractions or token counts):
    `expert_load/layerNN/max_over_uniform` and `expert_load/layerNN/cv` (platform.tracking.keys).
    A layer that routed no tokens (or whose loads are not finite) is left out."""
    _, shares = load_history(np.asarray(loads, dtype=np.float64)[None])
    shares = shares[0]
    experts = shares.shape[-1]
    summary = {}
    for layer, row in enumerate(shares):
        if np.isfinite(row).all():
            summary[expert_load_key(layer, MAX_OVER_UNIFORM)] = float(row.max() * experts)
            summary[expert_load_key(layer, CV)] = float(row.std() * experts)   # std / mean, mean = 1/E
    return summary


def expert_load_table(history: Any, steps: Optional[Sequence[int]] = None):
    """A pandas DataFrame with TABLE_COLUMNS: each expert's fraction of its layer's tokens.

    `history` is anything plots.load_history accepts. An ExpertLoadHistory that
    merged columns to stay bounded gives one row per span of steps, at the
    span's first step, with the span's mean fraction; NaN where a layer routed
    no tokens.
    """
    import pandas as pd

    step_arr, shares = load_history(history, steps)
    n_steps, layers, experts = shares.shape
    return pd.DataFrame({
        "step": np.repeat(step_arr.astype(np.int64), layers * experts),
        "layer": np.tile(np.repeat(np.arange(layers, dtype=np.int32), experts), n_steps),
        "expert": np.tile(np.arange(experts, dtype=np.int32), n_steps * layers),
        "fraction": shares.reshape(-1),
    }, columns=list(TABLE_COLUMNS))
