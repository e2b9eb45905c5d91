"""A job's DeepSpeed engine in a one-process gloo group: what the CPU benches time.

Shared by bench/train_step.py and bench/checkpoint.py so both measure the
engine the training workers build (`platform.train.engine`), on this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TinyJob:
    cfg: Any                 # JobConfig
    model: Any               # model.DBRX
    eng: Any                 # platform.train.engine.Engine
    micro_batches: list      # one global batch of random tokens, split into micro batches


def start(overrides: Sequence[str], threads: int = 1) -> TinyJob:
    """local_tiny (with `overrides`) at world size 1: process group, model, engine, a batch."""
    import torch
    import torch.distributed as dist

    from model import DBRX
    from platform.config import load_job
    from platform.layout import layout_for
    from platform.provision.head import free_local_port
    from platform.train.engine import build_job_engine, expert_parallel_group

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_job(ROOT / "conf" / "local_tiny.yaml", overrides)
    model = DBRX(cfg.model, ep_group=expert_parallel_group(1))
    eng = build_job_engine(cfg, layout_for(cfg, 1), model)
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.model.vocab_size - 100, (t.global_batch_size, t.seq_len + 1), generator=g)
    return TinyJob(cfg, model, eng, list(batch.split(t.micro_batch_size)))


def step(job: TinyJob) -> None:
    """One optimizer step on the job's batch."""
    import torch

    from platform.train.step import train_step

    train_step(job.eng.engine, job.micro_batches, torch.device("cpu"))


def stop() -> None:
    import torch.distributed as dist

    dist.destroy_process_group()
