"""Worker bodies for multi-process training tests (imported by spawned processes)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import DBRXConfig
from platform.config.schema import ClusterConfig, JobConfig, TrainConfig

GLOBAL_BATCH, MICRO, SEQ, VOCAB = 8, 2, 16, 128


def tiny_job(zero_stage: int) -> JobConfig:
    model = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=32,
                       moe_num_experts=4, moe_top_k=2, vocab_size=VOCAB, max_seq_len=64,
                       moe_jitter_eps=0.0, rope_theta=10000.0, moe_z_loss_weight=0.01)
    train = TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO, seq_len=SEQ,
                        total_tokens=10 ** 6, zero_stage=zero_stage, warmup_steps=2, lr=1e-2,
                        min_lr=1e-3)
    return JobConfig(name="t", model=model, train=train, cluster=ClusterConfig(min_nodes=1, max_nodes=2))


def global_batch(step: int) -> torch.Tensor:
    """Skewed data: every other token is the same id, so routing piles onto few experts."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    x[:, 1::2] = 7
    return x


def run(rank: int, world: int, port: int, zero_stage: int, load_from: str, save_to: str,
        steps: int, losses_out: str) -> None:
    """Build the engine at `world` workers, optionally load, train `steps`, save, record losses."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from platform.checkpoint.trainer_state import load_state, save_state
    from platform.layout import layout_for
    from platform.train.engine import build_job_engine, lr_at
    from platform.train.step import train_step
    from platform.train.worker import build_model

    cfg = tiny_job(zero_stage)
    layout = layout_for(cfg, world)
    model = build_model(cfg, layout, torch.device("cpu"))
    eng = build_job_engine(cfg, layout, model)
    start = 0
    if load_from:
        start = load_state(Path(load_from), eng, model, rank=rank, world_size=world).step
    per = GLOBAL_BATCH // world
    losses = []
    for step in range(start, start + steps):
        mine = global_batch(step)[rank * per:(rank + 1) * per]
        eng.set_lr(lr_at(cfg, step, 100))
        stats = train_step(eng.engine, list(mine.split(MICRO)), torch.device("cpu"))
        losses.append(stats.loss)
    if save_to:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        save_state(Path(save_to), eng, model, rank=rank, world_size=world,
                   ep=layout.expert_parallel, step=start + steps,
                   consumed_sequences=(start + steps) * GLOBAL_BATCH, extra={})
    if rank == 0 and losses_out:
        Path(losses_out).write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()
    # Everything is written. Interpreter teardown sometimes aborts here ("terminate called
    # without an active exception" from a native thread still running, ~1 run in 10 on 2
    # cores), which would fail a test whose results are all in: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
