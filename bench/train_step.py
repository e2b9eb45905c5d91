"""Training-step efficiency and checkpoint bandwidth on this machine, as ratios.

    python bench/train_step.py [--steps 6] [hydra overrides for conf/local_tiny.yaml ...]

1. Achieved FLOP/s of a DeepSpeed training step of the local_tiny model (exact
   FLOPs per token from model.counting) divided by this machine's own fp32
   matrix-multiply FLOP/s, measured in the same run: the CPU analogue of MFU.
2. Checkpoint save MB/s (the platform's world-size-independent format, through
   the CheckpointStore commit protocol: write, hash, fsync, rename) divided by
   a plain sequential write + fsync of the same number of bytes to the same disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from platform.provision.head import free_local_port as _free_port

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one worker's share)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)

    from model import DBRX
    from model.counting import training_flops_per_token
    from platform.checkpoint import CheckpointStore
    from platform.checkpoint.trainer_state import save_state
    from platform.config import load_job
    from platform.layout import layout_for
    from platform.train.engine import build_job_engine, expert_parallel_group
    from platform.train.step import train_step
    from platform.train.throughput import measured_peak_flops

    cfg = load_job(ROOT / "conf" / "local_tiny.yaml", args.overrides)
    layout = layout_for(cfg, 1)
    model = DBRX(cfg.model, ep_group=expert_parallel_group(1))
    eng = build_job_engine(cfg, layout, model)
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.model.vocab_size - 100, (t.global_batch_size, t.seq_len + 1), generator=g)
    micro = list(batch.split(t.micro_batch_size))
    train_step(eng.engine, micro, torch.device("cpu"))              # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(eng.engine, micro, torch.device("cpu"))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = t.global_batch_size * t.seq_len
    achieved = tokens * training_flops_per_token(cfg.model, t.seq_len) / step_s
    peak = measured_peak_flops()
    print(f"train step: {tokens} tokens in {step_s:.2f} s (median of {args.steps}), "
          f"{achieved / 1e9:.2f} GFLOP/s achieved; fp32 matmul peak {peak / 1e9:.2f} GFLOP/s")
    print(f"  ratio achieved / matmul peak: {achieved / peak:.3f}")

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        store = CheckpointStore(str(Path(tmp) / "ckpt"))
        saves, plain = [], []
        for i in range(3):
            start = time.perf_counter()
            staging = store.begin(i + 1)
            files = save_state(staging.path, eng, model, rank=0, world_size=1, ep=1, step=i + 1,
                               consumed_sequences=0, extra={})
            store.commit(staging, {"step": i + 1})
            saves.append(time.perf_counter() - start)
            size = sum((staging.path.parent.parent / f"step_{i + 1:09d}" / f).stat().st_size
                       for f in files)
            chunk = os.urandom(8 << 20)
            start = time.perf_counter()
            with open(Path(tmp) / f"plain-{i}", "wb") as f:
                left = size
                while left > 0:
                    f.write(chunk[:min(left, len(chunk))])
                    left -= len(chunk)
                f.flush()
                os.fsync(f.fileno())
            plain.append(time.perf_counter() - start)
        mb = size / 1e6
        save_rate, plain_rate = mb / statistics.median(saves), mb / statistics.median(plain)
        print(f"checkpoint: {mb:.0f} MB, save {save_rate:.0f} MB/s (median of 3, verified commit), "
              f"plain sequential write {plain_rate:.0f} MB/s")
        print(f"  ratio checkpoint save / plain write: {save_rate / plain_rate:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
