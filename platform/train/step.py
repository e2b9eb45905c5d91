"""One training step and one evaluation pass over a worker's micro batches.

A step keeps its statistics on the device until it is done (one host sync per
step, not one per micro batch, so a GPU never waits on the host between them),
then averages them over all ranks. It also says where its time went: forward
and backward of every micro batch, and the optimizer step DeepSpeed runs at the
accumulation boundary. On a GPU each phase ends with a synchronisation, or its
kernels would still be running when the clock is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from platform.collectives import mean_, sum_


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    lb_loss: float
    z_loss: float
    grad_norm: float
    expert_counts: torch.Tensor      # (layers, experts), summed over the global batch
    fwd_bwd_s: float = 0.0           # this rank's forward + backward time
    optimizer_s: float = 0.0         # this rank's optimizer time (gradient clipping included)

    def expert_fractions(self) -> "torch.Tensor":
        """Each layer's share of token assignments per expert (rows sum to 1; 0 for idle layers)."""
        counts = self.expert_counts.double()
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def training_loss(model, tokens: torch.Tensor):
    """(objective, LM loss, model output) of packed sequences [micro, seq_len+1]: next-token
    cross entropy (never materialising the logits) plus the weighted aux losses."""
    out = model(tokens[:, :-1], shift_labels=tokens[:, 1:], return_logits=False)
    return out.loss, out.lm_loss, out


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_step(engine, micro_batches: list[torch.Tensor], device: torch.device) -> StepStats:
    """One optimizer step of the DeepSpeed `engine` over this worker's micro batches;
    statistics averaged over every rank."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    counts = None
    fwd_bwd = optimizer = 0.0
    for mb in micro_batches:
        start = _clock(device)
        loss, lm, out = training_loss(engine, mb.to(device, non_blocking=True))
        engine.backward(loss)
        middle = _clock(device)
        engine.step()              # the optimizer runs at the accumulation boundary only
        fwd_bwd, optimizer = fwd_bwd + middle - start, optimizer + _clock(device) - middle
        sums += torch.stack([loss.detach(), lm.detach(), out.lb_loss.detach(),
                             out.z_loss.detach()]).double()
        c = out.expert_counts.detach()
        counts = c if counts is None else counts + c
    sums = mean_(sums.cpu() / len(micro_batches))
    counts = counts.cpu()
    sum_(counts)
    grad_norm = engine.get_global_grad_norm()
    return StepStats(*sums.tolist(), grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                     expert_counts=counts, fwd_bwd_s=fwd_bwd, optimizer_s=optimizer)


@torch.no_grad()
def evaluate(engine, batches: Iterable[list[torch.Tensor]], device: torch.device) -> Optional[float]:
    """Mean next-token loss over this rank's held-out `batches`, averaged over every rank
    (the same value on all); None when no rank had any."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for micro_batches in batches:
        for mb in micro_batches:
            _, lm, _ = training_loss(engine, mb.to(device))
            total += torch.tensor([lm.item(), 1.0], dtype=torch.float64)
    engine.train()
    sum_(total)
    return float(total[0] / total[1]) if total[1] else None
