"""The training loop each Ray Train worker runs.

One worker per GPU (or per CPU node). Every worker builds the same DeepSpeed
engine for the layout of the current world size, resumes from the job's
latest verified checkpoint (at any world size, see platform.train.state),
reads its slice of each global batch, and checkpoints every N steps, when a
preemption notice arrives, and at the end. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from platform.config.schema import JobConfig
from platform.train.collectives import mean_, sum_
from platform.train.engine import Engine

log = logging.getLogger("platform.train")

class PreemptionWatch:
    """Has this node been told it will be reclaimed? Checked once per step.

    The node agent (the IMDS spot watcher on AWS, `platform.provision.preemption
    notify` locally) writes a notice file in the node's directory and signals
    registered workers; Ray Train runs this loop off the main thread, where no
    signal handler can be installed, so the file is polled: one stat per step.
    Each notice triggers one checkpoint, also across worker restarts on the node
    (the node directory remembers which notice was answered).
    """

    def __init__(self) -> None:
        from platform.provision import preemption

        self._preemption = preemption
        self._notice = None
        preemption.register_worker()

    def pending(self) -> bool:
        self._notice = self._preemption.unhandled_notice()
        return self._notice is not None

    def handled(self) -> None:
        if self._notice is not None:
            self._preemption.mark_handled(self._notice)
        self._notice = None

    def close(self) -> None:
        self._preemption.unregister_worker()


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    lb_loss: float
    z_loss: float
    grad_norm: float
    expert_counts: torch.Tensor      # (layers, experts), summed over the global batch


def training_loss(model, tokens: torch.Tensor):
    """(objective, LM loss, model output) of packed sequences [micro, seq_len+1]: next-token
    cross entropy (never materialising the logits) plus the weighted aux losses."""
    out = model(tokens[:, :-1], shift_labels=tokens[:, 1:], return_logits=False)
    return out.loss, out.lm_loss, out


def train_step(eng: Engine, micro_batches: list[torch.Tensor], cfg: JobConfig,
               device: torch.device) -> StepStats:
    """One optimizer step over this worker's micro batches; statistics averaged globally.

    The statistics stay on the device until the step is done: one host sync per
    step, not one per micro batch, so a GPU never waits on the host between them.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    counts = None
    for mb in micro_batches:
        loss, lm, out = training_loss(eng.engine, mb.to(device, non_blocking=True))
        eng.engine.backward(loss)
        eng.engine.step()
        sums += torch.stack([loss.detach(), lm.detach(), out.lb_loss.detach(),
                             out.z_loss.detach()]).double()
        c = out.expert_counts.detach()
        counts = c if counts is None else counts + c
    sums = mean_(sums.cpu() / len(micro_batches))
    counts = counts.cpu()
    sum_(counts)
    grad_norm = eng.engine.get_global_grad_norm()
    return StepStats(*sums.tolist(), grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                     expert_counts=counts)


@torch.no_grad()
def evaluate(eng: Engine, data, cfg: JobConfig, rank: int, world_size: int,
             device: torch.device) -> Optional[float]:
    """Mean next-token loss over the held-out batches (same on every rank)."""
    eng.engine.eval()
    total, n = torch.zeros(2, dtype=torch.float64), 0
    for micro_batches in data.eval_batches(rank, world_size):
        for mb in micro_batches:
            _, lm, _ = training_loss(eng.engine, mb.to(device))
            total += torch.tensor([lm.item(), 1.0], dtype=torch.float64)
            n += 1
    eng.engine.train()
    sum_(total)
    return float(total[0] / total[1]) if total[1] else None


def measured_peak_flops(rounds: int = 5, seconds: float = 0.2) -> float:
    """This worker's fp32 matrix-multiply FLOP/s: the CPU denominator of MFU.

    The best of a few short rounds, so a moment of contention with another
    process does not understate the peak (and overstate MFU).
    """
    n = 1024
    g = torch.Generator().manual_seed(0)  # never draw from the global generator: the
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)  # run restores it
    a @ b
    best = 0.0
    for _ in range(rounds):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best
