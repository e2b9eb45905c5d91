"""Expert-load heatmaps: routing collapse visible at a glance in the MLflow UI.

A mixture-of-experts layer is healthy when its router spreads tokens evenly:
each of E experts gets 1/E of the load. Collapse (a few experts taking most
tokens, the rest starving) wastes capacity and is easy to miss in a loss curve.
The heatmap has one panel per layer; in each, a row per expert and a column
per step (or span of steps), coloured by the expert's load relative to
uniform on a log scale: white is balanced, red overloaded, blue starved.

Rendering uses matplotlib's object API (`Figure`, the Agg canvas) and never
pyplot, so it is safe in a background thread and leaves the process's backend
alone.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

# Layout, in inches at DPI dots per inch: panels of PANEL_W_IN, PANELS_PER_ROW
# to a row, each PANEL_H_PER_EXPERT_IN per expert within [PANEL_H_MIN_IN,
# PANEL_H_MAX_IN] plus a title; a colorbar column and a header for the title.
DPI = 100
PANELS_PER_ROW = 4
PANEL_W_IN = 4.0
PANEL_H_PER_EXPERT_IN = 0.15
PANEL_H_MIN_IN = 1.0
PANEL_H_MAX_IN = 3.0
PANEL_TITLE_IN = 0.4
COLORBAR_W_IN = 1.0
HEADER_IN = 0.6
MAX_COLUMNS = 1000   # more steps than this are averaged into spans


def figure_size_in(layers: int, experts: int) -> Tuple[float, float]:
    """(width, height) in inches of the heatmap of `layers` x `experts`."""
    cols = min(layers, PANELS_PER_ROW)
    rows = math.ceil(layers / cols)
    panel_h = min(max(PANEL_H_PER_EXPERT_IN * experts, PANEL_H_MIN_IN), PANEL_H_MAX_IN)
    return cols * PANEL_W_IN + COLORBAR_W_IN, rows * (panel_h + PANEL_TITLE_IN) + HEADER_IN


class ExpertLoadHistory:
    """Per-step expert loads in bounded memory, for the training loop to keep.

    Holds at most `capacity` columns; when full, neighbouring columns are
    merged (averaged), halving the time resolution, so a run of any length
    costs capacity x layers x experts floats. A layer whose loads are unusable
    at a step (NaN, no tokens) is left out of that column's average.
    """

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.capacity = capacity
        self._steps: list[int] = []          # first step of each column
        self._sums: list[np.ndarray] = []    # sum of valid per-step shares [L, E]
        self._counts: list[np.ndarray] = []  # valid steps per layer in each column [L, 1]
        self._merged: list[int] = []         # steps merged into each column
        self._span = 1                       # steps per column from now on

    def add(self, step: int, loads: Any) -> None:
        """Record one step's loads: [layers, experts] fractions or token counts."""
        share = _shares(np.asarray(loads, dtype=np.float64)[None])[0]
        if self._sums and share.shape != self._sums[-1].shape:
            raise ValueError(f"loads shape {share.shape} != {self._sums[-1].shape} of earlier steps")
        valid = np.isfinite(share).all(axis=-1, keepdims=True)
        share = np.where(valid, share, 0.0)
        if self._sums and self._merged[-1] < self._span:
            self._sums[-1] += share
            self._counts[-1] += valid
            self._merged[-1] += 1
            return
        if len(self._sums) == self.capacity:
            self._halve()
        self._steps.append(int(step))
        self._sums.append(share)
        self._counts.append(valid.astype(np.int64))
        self._merged.append(1)

    def _halve(self) -> None:
        n = len(self._sums) // 2 * 2
        pair = lambda xs: [xs[i] + xs[i + 1] for i in range(0, n, 2)] + xs[n:]  # noqa: E731
        self._steps = self._steps[0:n:2] + self._steps[n:]
        self._sums, self._counts, self._merged = pair(self._sums), pair(self._counts), pair(self._merged)
        self._span *= 2

    def __len__(self) -> int:
        return len(self._sums)

    def state_dict(self) -> dict:
        """Plain data to save with a checkpoint, so a restarted job keeps its heatmap's past."""
        stack = lambda xs: np.stack(xs) if xs else np.zeros((0, 0, 0))  # noqa: E731
        return {"capacity": self.capacity, "span": self._span, "steps": list(self._steps),
                "sums": stack(self._sums), "counts": stack(self._counts), "merged": list(self._merged)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ExpertLoadHistory":
        history = cls(int(state["capacity"]))
        history._span = int(state["span"])
        history._steps = [int(s) for s in state["steps"]]
        history._sums = [np.array(x, dtype=np.float64) for x in state["sums"]]
        history._counts = [np.array(x, dtype=np.int64) for x in state["counts"]]
        history._merged = [int(m) for m in state["merged"]]
        return history

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """(steps [T], mean load shares [T, layers, experts]; NaN where a layer had no data)."""
        if not self._sums:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0, 0))
        counts = np.stack(self._counts).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, np.stack(self._sums) / counts, np.nan)
        return np.asarray(self._steps, dtype=np.int64), means


def _shares(loads: np.ndarray) -> np.ndarray:
    """Each layer's loads as fractions summing to 1.

    A layer that saw no tokens, or whose loads are not finite and non-negative
    (a diverging router), is NaN at that step: drawn grey, never an exception
    in the training loop.
    """
    if loads.ndim != 3 or 0 in loads.shape[1:]:
        raise ValueError(f"expert loads must be [steps, layers, experts], got shape {loads.shape}")
    usable = np.isfinite(loads).all(axis=-1, keepdims=True) & (loads >= 0).all(axis=-1, keepdims=True)
    loads = np.where(usable, loads, 0.0)
    totals = loads.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(usable & (totals > 0), loads / totals, np.nan)


def load_history(history: Any, steps: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(steps [T], load shares [T, layers, experts]) from any accepted history.

    `history` is an `ExpertLoadHistory`, a mapping step -> [layers, experts],
    or an array-like [steps, layers, experts] (with `steps`, default 0..T-1).
    Loads may be fractions or token counts; each layer is normalised.
    """
    if isinstance(history, ExpertLoadHistory):
        step_arr, shares = history.arrays()
        if len(step_arr) == 0:
            raise ValueError("no expert-load records to plot")
        return step_arr, shares
    if isinstance(history, Mapping):
        keys = sorted(history)
        if not keys:
            raise ValueError("no expert-load records to plot")
        step_arr = np.asarray(keys, dtype=np.int64)
        loads = np.stack([np.asarray(history[k], dtype=np.float64) for k in keys])
    else:
        loads = np.asarray(history, dtype=np.float64)
        if len(loads) == 0:
            raise ValueError("no expert-load records to plot")
        step_arr = np.arange(len(loads)) if steps is None else np.array(steps, dtype=np.int64)
    if len(step_arr) != len(loads):
        raise ValueError(f"{len(step_arr)} steps for {len(loads)} load records")
    return step_arr, _shares(loads)


def load_summary(history: Any, steps: Optional[Sequence[int]] = None,
                 max_columns: int = MAX_COLUMNS) -> Tuple[np.ndarray, np.ndarray]:
    """`load_history` in at most `max_columns` columns: spans of consecutive steps averaged.

    All a heatmap needs, in memory bounded whatever the length of `history`.
    """
    return _bin(*load_history(history, steps), max_columns)


def _bin(steps: np.ndarray, shares: np.ndarray, max_columns: int) -> Tuple[np.ndarray, np.ndarray]:
    if len(steps) <= max_columns:
        return steps, shares
    spans = np.array_split(np.arange(len(steps)), max_columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # an all-NaN span stays NaN
        means = np.stack([np.nanmean(shares[s], axis=0) for s in spans])
    return np.asarray([steps[s[0]] for s in spans]), means


def max_load_ratio(history: Any, steps: Optional[Sequence[int]] = None) -> float:
    """The busiest expert's load over uniform at the latest step, over all layers.

    1.0 is perfectly balanced; `experts` means one expert takes every token.
    """
    _, shares = load_history(history, steps)
    latest = shares[-1]
    return float(np.nanmax(latest) * latest.shape[-1]) if np.isfinite(latest).any() else float("nan")


def expert_load_heatmap(history: Any, steps: Optional[Sequence[int]] = None, *,
                        title: Optional[str] = None, max_columns: int = MAX_COLUMNS):
    """A matplotlib Figure: one panel per layer, experts x steps, load relative to uniform."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    step_arr, shares = load_summary(history, steps, max_columns)
    n_steps, layers, experts = shares.shape
    ratio = shares * experts
    bound = float(max(experts, 2))
    shown = np.clip(ratio, 1.0 / bound, bound)   # NaN (no tokens) stays NaN: drawn grey

    fig = Figure(figsize=figure_size_in(layers, experts), dpi=DPI, layout="constrained")
    cols = min(layers, PANELS_PER_ROW)
    rows = math.ceil(layers / cols)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    cmap = _colormap()
    norm = LogNorm(vmin=1.0 / bound, vmax=bound)
    first, last = int(step_arr[0]), int(step_arr[-1])
    half = 0.5 * ((last - first) / (n_steps - 1) if n_steps > 1 else 1.0)
    image = None
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= layers:
            ax.set_visible(False)
            continue
        image = ax.imshow(shown[:, layer, :].T, aspect="auto", interpolation="nearest",
                          cmap=cmap, norm=norm, extent=(first - half, last + half, experts - 0.5, -0.5))
        peak = ratio[-1, layer, :]
        peak_text = f"{np.nanmax(peak):.1f}x" if np.isfinite(peak).any() else "no tokens"
        ax.set_title(f"layer {layer}  (busiest now: {peak_text} uniform)", fontsize=9)
        if layer % cols == 0:
            ax.set_ylabel("expert", fontsize=8)
        if layer + cols >= layers:   # lowest panel of its column: label the step axis
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
        ax.tick_params(labelsize=7)
    ticks = [2.0 ** k for k in range(-int(math.log2(bound)), int(math.log2(bound)) + 1)]
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), ticks=ticks, shrink=min(1.0, 3.0 / rows))
    bar.ax.set_yticklabels([f"{t:g}" for t in ticks], fontsize=7)
    bar.set_label("expert load / uniform (1/E)", fontsize=8)
    fig.suptitle(title or f"Expert load, {layers} layers x {experts} experts, steps {first}-{last}",
                 fontsize=10)
    return fig


def _colormap():
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="#bdbdbd")


def figure_png(fig) -> bytes:
    """The figure as PNG bytes, at its own size and DPI (no tight cropping: sizes stay predictable)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()
