"""`train_worker`: the function every Ray Train worker runs, start to finish.

It is re-run from the top after every failure or resize: the layout is
derived from the live world size, the state comes from the latest verified
checkpoint, and the data resumes at the checkpoint's global position, so a
restart continues the same run rather than starting a new one.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from platform.collectives import any_rank
from platform.config.schema import JobConfig
from platform.layout import Layout, layout_for
from platform.plan import checkpoint_every_steps, effective_precision
from platform.train import checkpointing
from platform.train.engine import build_job_engine, expert_parallel_group, lr_at
from platform.train.metrics import MetricsSink
from platform.train.policy import CheckpointPolicy, EvalPolicy, PreemptionWatch
from platform.train.step import evaluate, train_step
from platform.train.throughput import Throughput


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (pickled once by Ray)."""

    cfg: JobConfig
    run_id: Optional[str]             # MLflow run; None disables tracking
    data_path: str                    # prepared corpus on a path every worker can read
    total_steps: int
    progress_actor: Optional[str] = None   # named Ray actor that receives progress
    stop_after_step: Optional[int] = None  # tests: exit cleanly after this step


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _layout(cfg: JobConfig, world_size: int) -> Layout:
    layout = layout_for(cfg, world_size)
    if isinstance(layout, str):
        raise RuntimeError(f"cannot train on {world_size} workers: {layout}")
    return layout


def _init_weights(cfg: JobConfig, model) -> None:
    """Initialise every weight once, the same way whatever the expert-parallel degree.

    Each expert's weights come from a generator seeded by (seed, layer, expert),
    dense weights from one seeded generator, so a run started at 1 or 2
    workers begins from identical parameters.
    """
    std = cfg.model.initializer_range
    g = torch.Generator().manual_seed(cfg.train.seed)
    experts = {id(p) for p in model.expert_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in experts:
                rows = p.shape[0] // len(model.local_experts)
                for i, e in enumerate(model.local_experts):
                    layer = int(name.split(".")[1])
                    key = f"{cfg.train.seed}/{layer}/{e}/{name.rsplit('.', 1)[-1]}"
                    ge = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                    p[i * rows:(i + 1) * rows].normal_(0.0, std, generator=ge)
            elif p.ndim >= 2:
                p.normal_(0.0, std, generator=g)
            else:
                p.fill_(1.0)


def build_model(cfg: JobConfig, layout: Layout, device: torch.device):
    """The DBRX of this worker's experts, built without memory on the meta device and
    materialised once on `device` with the seeded initialisation (no throw-away init)."""
    from model import DBRX

    with torch.device("meta"):
        model = DBRX(cfg.model, ep_group=expert_parallel_group(layout.expert_parallel))
    model.materialize(device)
    _init_weights(cfg, model)
    return model


def _timed(batches: Iterable):
    """(seconds spent waiting for it, item) for each item of `batches`."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - start, item


def train_worker(args: WorkerArgs) -> None:
    """Set up, resume, train to the last step (or a stop), checkpointing as the policy says."""
    import warnings

    import ray.train

    # DeepSpeed's ZeRO step calls a torch.distributed collective that torch has
    # deprecated; the warning says nothing a user can act on and repeats per worker.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    from platform.data.loader import TrainingData

    cfg = args.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    layout = _layout(cfg, world)
    device = _device()
    torch.set_num_threads(max(1, cfg.cluster.cpus_per_worker))

    model = build_model(cfg, layout, device)
    # Router jitter draws from the global generator: seed it per rank; a resume at the
    # same world size then restores the exact saved generator state.
    torch.manual_seed(zlib.crc32(f"{cfg.train.seed}/rank{rank}".encode()))
    eng = build_job_engine(cfg, layout, model, bf16=effective_precision(cfg) == "bf16")
    _report_kernel(cfg, model, rank, device)
    store = checkpointing.open_checkpoints(cfg)
    saver = checkpointing.Checkpointer(store, eng, model, rank=rank, world_size=world,
                                       keep_last=cfg.checkpoint.keep_last,
                                       async_save=cfg.checkpoint.async_save)
    data = TrainingData(cfg, args.data_path)
    rates = Throughput.for_job(cfg, world, device)
    checkpoint_policy = CheckpointPolicy(checkpoint_every_steps(cfg), args.total_steps)
    eval_policy = EvalPolicy(cfg.train.eval_every_steps, args.total_steps)
    metrics = MetricsSink.for_rank(rank, cfg, args.total_steps, args.run_id, args.progress_actor)
    preempt = PreemptionWatch()
    try:
        resumed = checkpointing.resume(store, eng, model, rank=rank, world_size=world)
        start = resumed.step if resumed else 0
        eval_loss = resumed.state.extra.get("eval_loss") if resumed else None
        metrics.started(resumed, layout, start)
        step_began = time.perf_counter()
        batches = data.batches(rank, world, start_sequences=start * cfg.train.global_batch_size,
                               stop_step=args.total_steps)
        for data_wait, (step, micro_batches) in _timed(batches):
            lr = lr_at(cfg, step, args.total_steps)
            eng.set_lr(lr)
            stats = train_step(eng.engine, micro_batches, device)
            done = step + 1
            tokens_per_s, mfu = rates.rates(time.perf_counter() - step_began)
            metrics.step(done, stats, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu,
                         data_wait_s=data_wait, mixture=data.mixture_at(step))
            if eval_policy.should_evaluate(done):
                measured = evaluate(eng.engine, data.eval_batches(rank, world), device)
                if measured is not None:
                    eval_loss = measured
                    metrics.evaluated(done, eval_loss)
            preempted = any_rank(preempt.pending())
            if checkpoint_policy.should_checkpoint(done, preempted):
                metrics.before_checkpoint(done)
                stall = saver.save(done, consumed_sequences=done * cfg.train.global_batch_size,
                                   extra={"run_id": args.run_id or "", "loss": stats.loss,
                                          "eval_loss": eval_loss, "data_cache_key": data.cache_key})
                metrics.checkpointed(done, stall, preempted)
                # A notice is answered once its checkpoint is visible; a failed one is retried.
                if preempted and saver.wait():
                    preempt.handled()
            for report in saver.finished():
                metrics.checkpoint_done(report)
            step_began = time.perf_counter()   # evaluation and checkpoints stay out of throughput
            if args.stop_after_step is not None and done >= args.stop_after_step:
                break
        saver.wait()   # the job ends once its last checkpoint is visible
        for report in saver.finished():
            metrics.checkpoint_done(report)
    finally:
        preempt.close()
        metrics.close()


def _report_kernel(cfg: JobConfig, model, rank: int, device: torch.device) -> None:
    """Say once per worker which MoE expert kernel its training runs (see model.kernels)."""
    from model.kernels import select_backend

    dtype = next(model.parameters()).dtype
    backend = select_backend(device, dtype, cfg.model.d_model, cfg.model.ffn_hidden_size)
    print(f"[rank {rank}] MoE expert kernel: {backend} ({device.type}, "
          f"{str(dtype).removeprefix('torch.')})", flush=True)
