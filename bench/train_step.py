"""Training-step efficiency on this machine, as a ratio.

    python bench/train_step.py [--steps 6] [hydra overrides for conf/local_tiny.yaml ...]

Achieved FLOP/s of a DeepSpeed training step of the local_tiny model (exact
FLOPs per token from model.counting) divided by this machine's own fp32
matrix-multiply FLOP/s, measured in the same run: the CPU analogue of MFU.
Checkpoint throughput has its own bench, bench/checkpoint.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import tiny_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one worker's share)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from model.counting import training_flops_per_token
    from platform.train.throughput import measured_peak_flops

    job = tiny_engine.start(args.overrides, args.threads)
    tiny_engine.step(job)                                          # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        tiny_engine.step(job)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    t = job.cfg.train
    tokens = t.global_batch_size * t.seq_len
    achieved = tokens * training_flops_per_token(job.cfg.model, t.seq_len) / step_s
    peak = measured_peak_flops()
    print(f"train step: {tokens} tokens in {step_s:.2f} s (median of {args.steps}), "
          f"{achieved / 1e9:.2f} GFLOP/s achieved; fp32 matmul peak {peak / 1e9:.2f} GFLOP/s")
    print(f"  ratio achieved / matmul peak: {achieved / peak:.3f}")
    tiny_engine.stop()


if __name__ == "__main__":
    sys.exit(main())
