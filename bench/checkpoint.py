"""Checkpoint save speed and training stall, against a raw write of the same bytes to the same disk.

    python bench/checkpoint.py [--rounds 7] [--dir DIR] [--quick] [overrides for conf/local_tiny.yaml ...]

Each round times, in an order that rotates from round to round (a loaded machine
then slows none of them systematically):

- save sync / save async: the platform's real save (`platform.train.checkpointing.
  Checkpointer`, as the training loop builds it: the world-size-independent format,
  then the CheckpointStore commit: hash, fsync, rename, retention) of local_tiny's
  model in a one-process gloo group, with `checkpoint.async_save=false` (everything
  in the training thread: today's stall) and `=true` (training waits only for the
  copy into host memory; writing and committing run in a background thread).
  Stall: how long `save` blocked training. Total: from the start of the save to its
  commit; the bench waits for it idle, so in a run, where training steps share the
  CPU and the disk with the background write, steps slow down besides the stall.
- raw: one sequential write + fsync of the same number of bytes (8 MiB blocks of
  random bytes, as incompressible as fp32 state) into the same folder.
- dd: `dd if=/dev/zero bs=8M conv=fsync` of the same bytes, the reference the raw
  baseline must match within 20%.

Every write goes to a new file; the previous one is deleted and `os.sync()` runs
between measurements, outside the timings, so that no measurement overwrites an
existing file or pays for another's deferred writeback. Rates are medians over
rounds; ratios are taken within each round, then their median.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tiny_engine

BLOCK = 8 << 20
MB = 1e6
# ~45 MB of state: every path runs, in seconds (tests run it); rates this small are not the disk's.
QUICK = ["model.vocab_size=4096", "model.n_layers=2", "train.global_batch_size=4",
         "train.micro_batch_size=4"]


@dataclass
class Timing:
    stall_s: float     # training blocked
    total_s: float     # until the bytes are durable (committed, for a save)
    nbytes: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / MB / self.total_s

    def __str__(self) -> str:
        return (f"stall {self.stall_s:.3f} s, total {self.total_s:.3f} s, "
                f"{self.nbytes / MB:.1f} MB, {self.mb_per_s:.0f} MB/s")


def saver(job: tiny_engine.TinyJob, store, async_save: bool):
    """The training loop's Checkpointer, with `checkpoint.async_save` as the run would set it."""
    from platform.train.checkpointing import Checkpointer

    return Checkpointer(store, job.eng, job.model, rank=0, world_size=1,
                        keep_last=job.cfg.checkpoint.keep_last, async_save=async_save)


def save_once(job: tiny_engine.TinyJob, checkpointer, step: int) -> Timing:
    """One save as the training loop takes it; then wait for its commit, as the end of training does."""
    stall = checkpointer.save(step, consumed_sequences=step * job.cfg.train.global_batch_size,
                              extra={})
    if not checkpointer.wait():
        raise RuntimeError(f"checkpoint step {step} failed: {checkpointer.finished()[-1].error}")
    (report,) = checkpointer.finished()
    return Timing(stall, report.total_s, checkpointer.store.get(step).manifest.total_size)


def raw_write(path: Path, nbytes: int, block: bytes) -> Timing:
    """Sequential write + fsync of `nbytes` into a new file, unbuffered, as a writer at disk speed."""
    view = memoryview(block)
    start = time.perf_counter()
    with open(path, "xb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(view[:min(left, len(view))])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    return Timing(seconds, seconds, nbytes)


def dd_command(path: Path, nbytes: int) -> list[str]:
    """dd writing exactly `nbytes` (count in bytes, 8 MiB blocks) and fsyncing before it exits."""
    return ["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={nbytes}", "iflag=count_bytes",
            "conv=fsync"]


def dd_write(path: Path, nbytes: int) -> Timing:
    start = time.perf_counter()
    subprocess.run(dd_command(path, nbytes), check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return Timing(seconds, seconds, nbytes)


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True)
    return out.stdout.split()[-1] if out.returncode == 0 else "unknown"


def mismatch_reasons(raw: list[float], dd: list[float], nbytes: int, fs: str) -> list[str]:
    """Why the raw write and dd may disagree on this run, from what the run can observe."""
    reasons = []
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores:
        reasons.append(f"the machine is loaded (load average {load:.1f} on {cores} cores), so "
                       "rounds disagree: run more rounds, or on a quiet machine")
    for name, rates in (("raw", raw), ("dd", dd)):
        if len(rates) > 1 and max(rates) > 1.5 * min(rates):
            reasons.append(f"{name} varied {min(rates):.0f}..{max(rates):.0f} MB/s between rounds "
                           "(other writers on the disk, or its write cache filling)")
    if fs in ("btrfs", "zfs"):
        reasons.append(f"{fs} may compress: dd's zeros cost less to store than random bytes")
    if nbytes < 64 * MB:
        reasons.append(f"{nbytes / MB:.0f} MB is small: per-file costs (create, journal commit, "
                       "fsync latency) weigh as much as the bytes")
    return reasons or ["nothing this run can see explains it: rerun with more --rounds"]


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def report(nbytes: int, fs: str, directory: Path, times: dict[str, list[Timing]]) -> None:
    rate = {name: [t.mb_per_s for t in ts] for name, ts in times.items()}
    print(f"\n{nbytes / MB:.1f} MB per checkpoint on {fs} at {directory}; "
          f"medians of {len(times['raw'])} rounds")
    for name, ts in times.items():
        print(f"  {name:10s} stall {statistics.median(t.stall_s for t in ts):7.3f} s, "
              f"total {statistics.median(t.total_s for t in ts):7.3f} s, "
              f"{statistics.median(rate[name]):6.0f} MB/s")
    print(f"  dd command: {' '.join(dd_command(directory / 'FILE', nbytes))}")
    raw_dd = median_ratio(rate["raw"], rate["dd"])
    verdict = "matches dd within 20%" if abs(raw_dd - 1) <= 0.2 else "differs from dd by more than 20%"
    print("ratios, each the median over rounds of that round's ratio (robust to load that drifts):")
    print(f"  raw write / dd: {raw_dd:.2f}: the raw baseline {verdict}")
    if abs(raw_dd - 1) > 0.2:
        for reason in mismatch_reasons(rate["raw"], rate["dd"], nbytes, fs):
            print(f"    - {reason}")
    for name in times:
        if name.startswith("save"):
            print(f"  {name} MB/s / raw write MB/s: {median_ratio(rate[name], rate['raw']):.2f} "
                  "(target >= 0.8)")
    stall = median_ratio([t.stall_s for t in times["save async"]],
                         [t.total_s for t in times["save sync"]])
    print(f"  stall save async / total save sync: {stall:.1%} (target <= 10%)")


def run_rounds(job: tiny_engine.TinyJob, directory: Path, rounds: int) -> None:
    """Warm up with one save each, then time every measurement once per round, in rotating order."""
    from platform.checkpoint import CheckpointStore

    savers = {f"save {v}": saver(job, CheckpointStore(str(directory / f"ckpt-{v}")), v == "async")
              for v in ("sync", "async")}
    step = 1
    for checkpointer in savers.values():          # first-save costs: host buffers, folders
        nbytes = save_once(job, checkpointer, step).nbytes
    block = os.urandom(BLOCK)
    scratch = directory / "raw"
    measures: dict[str, Callable[[int], Timing]] = {
        **{name: (lambda s, c=c: save_once(job, c, s)) for name, c in savers.items()},
        "raw": lambda s: raw_write(scratch, nbytes, block),
        "dd": lambda s: dd_write(scratch, nbytes),
    }
    times: dict[str, list[Timing]] = {name: [] for name in measures}
    for r in range(rounds):
        print(f"round {r + 1}", flush=True)
        for name in rotated(list(measures), r):
            step += 1
            os.sync()                             # no measurement pays for another's writeback
            times[name].append(measures[name](step))
            print(f"  {name:10s} {times[name][-1]}", flush=True)
            if name in ("raw", "dd"):
                scratch.unlink()                  # the next one writes a new file too
    report(nbytes, filesystem(directory), directory, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", help="folder on the disk to measure (default: a temporary folder "
                                      "beside the job's local checkpoint root)")
    parser.add_argument("--quick", action="store_true", help="~45 MB and 2 rounds, for tests")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    job = tiny_engine.start((QUICK if args.quick else []) + args.overrides)
    tiny_engine.step(job)                         # Adam's moments exist after the first step
    if not args.dir and "://" in job.cfg.checkpoint.uri:
        parser.error(f"checkpoint.uri {job.cfg.checkpoint.uri} is not on a local disk: pass --dir")
    parent = Path(args.dir or os.path.expanduser(job.cfg.checkpoint.uri))
    parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=parent))
    try:
        run_rounds(job, directory, 2 if args.quick else args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        tiny_engine.stop()


if __name__ == "__main__":
    sys.exit(main())
