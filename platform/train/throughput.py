"""Tokens per second and model FLOPs utilisation of a training step.

MFU is model FLOPs (model/counting.py: every matrix product, no
recomputation) over the peak the workers could do: the configured
`cluster.peak_tflops_per_device` on GPUs (a datasheet figure), and on CPUs
this worker's own fp32 matrix-multiply rate, measured once at start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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


@dataclass(frozen=True)
class Throughput:
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float          # of one worker
    world_size: int

    @classmethod
    def for_job(cls, cfg, world_size: int, device: torch.device) -> "Throughput":
        from model.counting import training_flops_per_token

        peak_tflops = cfg.cluster.peak_tflops_per_device
        peak = peak_tflops * 1e12 if device.type == "cuda" and peak_tflops else measured_peak_flops()
        return cls(tokens_per_step=cfg.train.global_batch_size * cfg.train.seq_len,
                   flops_per_token=training_flops_per_token(cfg.model, cfg.train.seq_len),
                   peak_flops=peak, world_size=world_size)

    def rates(self, step_seconds: float) -> tuple[float, float]:
        """(tokens/s, MFU) of a step that took `step_seconds`."""
        tokens_per_s = self.tokens_per_step / step_seconds
        return tokens_per_s, tokens_per_s * self.flops_per_token / (self.world_size * self.peak_flops)
