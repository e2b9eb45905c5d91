"""Training progress from rank 0 to the submitting terminal.

Rank 0 pushes (step, loss, tokens/s, world size) to a small named actor after
every step, and each eval loss; the driver polls it and draws a tqdm bar with
an ETA. The actor is the only channel that works the same when the driver runs
on the head and the workers on other nodes.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state = {"step": 0, "total": 0, "loss": None, "tokens_per_s": None, "world_size": 0,
                      "updated": 0.0, "eval_loss": None}

    def update(self, step: int, total: int, loss: Optional[float], tokens_per_s: Optional[float],
               world_size: int) -> None:
        """loss and tokens/s are None for a step restored from a checkpoint rather than trained."""
        self.state.update(step=step, total=total, loss=loss, tokens_per_s=tokens_per_s,
                          world_size=world_size, updated=time.time())

    def report_eval(self, loss: float) -> None:
        self.state["eval_loss"] = loss

    def get(self) -> dict:
        return self.state


class ProgressBar:
    """A tqdm bar in this process that follows a ProgressBoard until stopped."""

    def __init__(self, name: str, total: int, start: int = 0, interval_s: float = 1.0) -> None:
        self.name, self.total, self.interval_s = name, total, interval_s
        # On the driver's node: placed anywhere, it can land on a worker node, die with
        # it, and leave the bar (and the job's final report) stuck at that step.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.board = ProgressBoard.options(
            name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True,
                                        name="progress-bar")
        self.last: Optional[dict] = None

    def __enter__(self) -> "ProgressBar":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:  # what arrived after the last poll (the final eval) belongs in the outcome
            state = ray.get(self.board.get.remote(), timeout=5)
            if state["step"]:
                self.last = state
        except Exception:
            pass
        ray.kill(self.board)

    def _run(self, start: int) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=start, unit="step", dynamic_ncols=True,
                   desc="training", smoothing=0.1)
        shown = start
        while not self._stop.is_set():
            try:
                state = ray.get(self.board.get.remote(), timeout=10)
            except Exception:  # the board restarts with the cluster; keep drawing
                state = None
            if state and state["step"] and state["step"] != shown:   # redraw on progress only:
                self.last = state                                    # a log file gets one line a step
                bar.update(max(0, state["step"] - shown))
                shown = state["step"]
                bar.set_postfix(loss=_fmt(state["loss"], ".3f"), tok_s=_fmt(state["tokens_per_s"], ".0f"),
                                workers=state["world_size"], refresh=False)
                bar.refresh()
            self._stop.wait(self.interval_s)
        bar.close()


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)
