"""Tiny training jobs for checkpoint tests: DeepSpeed over gloo in spawned processes (the
worker bodies below), and a one-process stand-in (`PlainTrainer`)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from model.config import DBRXConfig
from platform.checkpoint import CheckpointStore
from platform.config.schema import ClusterConfig, JobConfig, TrainConfig

GLOBAL_BATCH, MICRO, SEQ, VOCAB = 8, 2, 16, 128
# Cut the tiny model's dense parameters into row ranges of a few rows, as a big model's are.
CHUNK_BYTES = 8 << 10


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


class Job:
    """One rank of a tiny expert-parallel DeepSpeed job over gloo."""

    def __init__(self, rank: int, world: int, port: int, zero_stage: int) -> None:
        if not dist.is_initialized():   # one process group serves every job of the process
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                              WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
            torch.set_num_threads(1)
            dist.init_process_group("gloo", rank=rank, world_size=world)
        from platform.layout import layout_for
        from platform.train.engine import build_job_engine
        from platform.train.worker import build_model

        self.rank, self.world = rank, world
        self.cfg = tiny_job(zero_stage)
        self.layout = layout_for(self.cfg, world)
        self.model = build_model(self.cfg, self.layout, torch.device("cpu"))
        self.eng = build_job_engine(self.cfg, self.layout, self.model)

    def train(self, start: int, stop: int) -> list[float]:
        """Steps [start, stop) on this rank's share of the global batches; their losses."""
        from platform.train.engine import lr_at
        from platform.train.step import train_step

        per = GLOBAL_BATCH // self.world
        losses = []
        for step in range(start, stop):
            mine = global_batch(step)[self.rank * per:(self.rank + 1) * per]
            self.eng.set_lr(lr_at(self.cfg, step, 100))
            losses.append(train_step(self.eng.engine, list(mine.split(MICRO)), torch.device("cpu")).loss)
        return losses

    def checkpointer(self, store: CheckpointStore, *, async_save: bool, **kwargs):
        from platform.train.checkpointing import Checkpointer

        return Checkpointer(store, self.eng, self.model, rank=self.rank, world_size=self.world,
                            keep_last=5, async_save=async_save, chunk_bytes=CHUNK_BYTES, **kwargs)


class PlainTrainer:
    """A tiny DBRX under plain torch Adam in this process, duck-typed as the engine the
    checkpoint code reads (it reads it as it reads ZeRO stage 0): milliseconds per save."""

    def __init__(self, model) -> None:
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        self.eng = types.SimpleNamespace(basic_optimizer=self.opt, expert_parallel=1,
                                         engine=types.SimpleNamespace(optimizer=self.opt))
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> None:
        self.opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=self.gen)).sum() for p in self.model.parameters())
        loss.backward()
        self.opt.step()

    def checkpointer(self, store: CheckpointStore, **kwargs):
        from platform.train.checkpointing import Checkpointer

        kwargs = {"rank": 0, "world_size": 1, "keep_last": 3, "chunk_bytes": CHUNK_BYTES, **kwargs}
        return Checkpointer(store, self.eng, self.model, **kwargs)


def _exit() -> None:
    """Leave without interpreter teardown, once everything is written.

    Teardown sometimes aborts ("terminate called without an active exception" from a
    native thread still running, ~1 run in 10 on 2 cores), which would fail a test whose
    results are all in.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(rank: int, world: int, port: int, runs: list[dict]) -> None:
    """Jobs at `world` workers, one after the other in these processes (process start-up,
    torch and DeepSpeed imports, is most of a tiny job's cost). Each run: build the engine at
    ZeRO stage `zero`, optionally resume from the checkpoint store `load`, train `steps`,
    save into the store `save` after `save_at` of them (default: all), record the losses
    in `losses`."""
    from platform.train.checkpointing import resume

    for spec in runs:
        job = Job(rank, world, port, spec["zero"])
        start = 0
        if spec.get("load"):
            start = resume(CheckpointStore(spec["load"]), job.eng, job.model, rank=rank,
                           world_size=world).step
        steps = spec.get("steps", 0)
        save_at = start + spec.get("save_at", steps)
        losses = job.train(start, save_at)
        if spec.get("save"):
            job.checkpointer(CheckpointStore(spec["save"]), async_save=False).save(
                save_at, consumed_sequences=save_at * GLOBAL_BATCH, extra={})
        losses += job.train(save_at, start + steps)
        if rank == 0 and spec.get("losses"):
            Path(spec["losses"]).write_text(json.dumps(losses))
    _exit()


# ----------------------------------------------------------------------------- background saves


class ScriptedStore(CheckpointStore):
    """A real store whose `push` can be held at a gate (announcing it in a file) or made to fail."""

    def __init__(self, root, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.gate: Optional[threading.Event] = None
        self.at_gate: Optional[Path] = None
        self.fail = False

    def push(self, staging, paths=None):
        if self.fail:
            raise OSError("disk full")
        if self.gate is not None:
            if self.at_gate is not None:
                self.at_gate.touch()
            self.gate.wait()
        return super().push(staging, paths)


class Recorder:
    """A MetricsLogger stand-in that keeps what the sink logs."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.events: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.update(metrics)

    def event(self, name: str, step: int, **details) -> None:
        self.events.append({"name": name, "step": step, **details})


def _consumed(step: int) -> dict:
    return {"consumed_sequences": step * GLOBAL_BATCH, "extra": {"loss": 1.0}}


def run_in_flight(rank: int, world: int, port: int, root: str, out: str) -> None:
    """A save of step 2 held in flight while steps 2-3 train; then one that fails on the last
    rank while step 4 trains, and one that succeeds. Rank 0 writes what it saw to `out`."""
    from platform.train.metrics import MetricsSink

    job = Job(rank, world, port, zero_stage=1)
    job.train(0, 2)
    job.checkpointer(CheckpointStore(f"{root}/sync"), async_save=False).save(2, **_consumed(2))

    store = ScriptedStore(f"{root}/async")
    store.gate = threading.Event()
    saver = job.checkpointer(store, async_save=True)
    stall = saver.save(2, **_consumed(2))
    job.train(2, 4)                                   # collectives while the save is held
    in_flight = {"committed": store.list_committed(), "stall_s": stall}
    store.gate.set()
    committed = saver.wait()
    reports = saver.finished()

    store.gate, store.fail = None, rank == world - 1
    saver.save(4, **_consumed(4))
    job.train(4, 5)                                   # training goes on past the failure
    failed_committed = saver.wait()
    reports += saver.finished()
    after_failure = store.list_committed()
    store.fail = False
    saver.save(5, **_consumed(5))
    saver.wait()
    reports += saver.finished()
    if rank == 0:
        recorder = Recorder()
        sink = MetricsSink(job.cfg, 10, logger=recorder)
        for report in reports:
            sink.checkpoint_done(report)
        Path(out).write_text(json.dumps({
            "in_flight": in_flight, "committed": committed, "failed_committed": failed_committed,
            "after_failure": after_failure, "final": store.list_committed(),
            "reports": [r.__dict__ for r in reports],
            "metrics": recorder.metrics, "events": recorder.events,
            "staging_left": sorted(p.name for p in (Path(root) / "async" / ".staging").iterdir()),
        }))
    _exit()


def run_killed(rank: int, world: int, port: int, root: str, out: str) -> None:
    """Train 2 steps, save; train 2 more (losses to `out`), start a save of step 4 that stays in
    flight, and wait there to be killed (`<out>.rank<N>` appears once the save is held)."""
    job = Job(rank, world, port, zero_stage=1)
    store = ScriptedStore(root)
    saver = job.checkpointer(store, async_save=True)
    losses = job.train(0, 2)
    saver.save(2, **_consumed(2))
    saver.wait()
    losses += job.train(2, 4)
    if rank == 0:
        Path(out).write_text(json.dumps(losses))
    store.gate, store.at_gate = threading.Event(), Path(f"{out}.rank{rank}")
    saver.save(4, **_consumed(4))
    time.sleep(3600)


def run_resumed(rank: int, world: int, port: int, root: str, out: str) -> None:
    """Resume from the store's latest checkpoint, train to step 4, save it; rank 0 writes the
    resumed step, the losses and the committed steps to `out`."""
    from platform.train.checkpointing import resume

    job = Job(rank, world, port, zero_stage=1)
    store = CheckpointStore(root)
    resumed = resume(store, job.eng, job.model, rank=rank, world_size=world)
    losses = job.train(resumed.step, 4)
    saver = job.checkpointer(store, async_save=True)
    saver.save(4, **_consumed(4))
    saver.wait()
    if rank == 0:
        Path(out).write_text(json.dumps({"step": resumed.step, "losses": losses,
                                         "committed": store.list_committed()}))
    _exit()
