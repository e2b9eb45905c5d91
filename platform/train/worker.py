"""`train_worker`: the function every Ray Train worker runs, start to finish.

It is re-run from the top after every failure or resize: the layout is
derived from the live world size, the state comes from the latest verified
checkpoint, and the data resumes at the checkpoint's global position, so a
restart continues the same run rather than starting a new one.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from platform.config.schema import JobConfig
from platform.layout import Layout, layout_for
from platform.train import checkpointing
from platform.train.collectives import any_rank
from platform.train.engine import build_job_engine, expert_parallel_group, lr_at
from platform.plan import effective_precision
from platform.train.loop import (
    PreemptionWatch, evaluate, measured_peak_flops, train_step,
)

log = logging.getLogger("platform.train")


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (pickled once by Ray)."""

    cfg: JobConfig
    run_id: Optional[str]             # MLflow run; None disables tracking
    data_path: str                    # prepared corpus on a path every worker can read
    total_steps: int
    progress_actor: Optional[str] = None   # named Ray actor that receives progress
    stop_after_step: Optional[int] = None  # tests: exit cleanly after this step


def _progress(name: Optional[str]):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None


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


def _seed_model_init(cfg: JobConfig, model, layout: Layout) -> None:
    """Initialise weights the same way whatever the expert-parallel degree.

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


def train_worker(args: WorkerArgs) -> None:
    import warnings

    import ray.train

    # DeepSpeed's ZeRO step calls a torch.distributed collective that torch has
    # deprecated; the warning says nothing a user can act on and repeats per worker.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)

    from platform.data.loader import TrainingData
    from model import DBRX

    cfg = args.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    layout = _layout(cfg, world)
    device = _device()
    torch.set_num_threads(max(1, cfg.cluster.cpus_per_worker))

    # Router jitter draws from the global generator: seed it per rank; a resume
    # at the same world size then restores the exact saved generator state.
    torch.manual_seed(zlib.crc32(f"{cfg.train.seed}/rank{rank}".encode()))
    ep_group = expert_parallel_group(layout.expert_parallel)
    model = DBRX(cfg.model, ep_group=ep_group)
    _seed_model_init(cfg, model, layout)
    eng = build_job_engine(cfg, layout, model.to(device), bf16=effective_precision(cfg) == "bf16")
    _report_kernel(cfg, model, rank, device)
    store = checkpointing.open_checkpoints(cfg)
    logger = _logger(cfg, args.run_id) if rank == 0 else None
    progress = _progress(args.progress_actor) if rank == 0 else None

    resumed = checkpointing.resume(store, eng, model, rank=rank, world_size=world)
    step = resumed.step if resumed else 0
    if logger is not None:
        _log_start(logger, resumed, layout, step)
    eval_loss = resumed.state.extra.get("eval_loss") if resumed else None
    if progress is not None and resumed is not None:
        # The board hears of trained steps: until one is (or if none is, the job stopped
        # right after resuming) the bar and the job's last line would say step 0.
        progress.update.remote(step, args.total_steps, resumed.state.extra.get("loss"), None, world)
        if eval_loss is not None:
            progress.report_eval.remote(eval_loss)
    data = TrainingData(cfg, args.data_path)
    preempt = PreemptionWatch()
    peak = (cfg.cluster.peak_tflops_per_device * 1e12 if device.type == "cuda"
            and cfg.cluster.peak_tflops_per_device else measured_peak_flops())
    from model.counting import training_flops_per_token

    flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    history = None
    if logger is not None:
        from platform.tracking.plots import ExpertLoadHistory

        history = ExpertLoadHistory()
    every = cfg.checkpoint.every_steps
    t_last = time.perf_counter()
    for step, micro_batches in data.batches(rank, world, start_sequences=step * cfg.train.global_batch_size,
                                            stop_step=args.total_steps):
        lr = lr_at(cfg, step, args.total_steps)
        eng.set_lr(lr)
        stats = train_step(eng, micro_batches, cfg, device)
        done = step + 1
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        tok_s = tokens_per_step / dt
        mfu = tok_s * flops_per_token / (world * peak)
        if logger is not None:
            fractions = (stats.expert_counts.double()
                         / stats.expert_counts.sum(-1, keepdim=True).clamp(min=1)).numpy()
            history.add(done, fractions)
            if done % cfg.train.log_every_steps == 0 or done == args.total_steps:
                metrics = {"loss": stats.loss, "lm_loss": stats.lm_loss, "lb_loss": stats.lb_loss,
                           "z_loss": stats.z_loss, "lr": lr, "grad_norm": stats.grad_norm,
                           "tokens_per_s": tok_s, "mfu": mfu, "world_size": world,
                           "expert_parallel": layout.expert_parallel,
                           "tokens_seen": done * tokens_per_step}
                for layer, row in enumerate(fractions):
                    for e, f in enumerate(row):
                        metrics[f"expert_load/layer{layer:02d}/e{e:02d}"] = float(f)
                for name, n in data.mixture_at(step).items():
                    metrics[f"mixture/{name}"] = n / cfg.train.global_batch_size
                logger.log_metrics(metrics, step=done)
        if progress is not None:
            progress.update.remote(done, args.total_steps, stats.loss, tok_s, world)
        eval_now = done % cfg.train.eval_every_steps == 0 or done == args.total_steps
        if eval_now:
            measured = evaluate(eng, data, cfg, rank, world, device)
            if measured is not None:
                eval_loss = measured
                if logger is not None:
                    logger.log_metrics({"eval_loss": eval_loss}, step=done)
                if progress is not None:
                    progress.report_eval.remote(eval_loss)
        preempted = any_rank(preempt.pending())
        if done % every == 0 or preempted or done == args.total_steps:
            seconds = checkpointing.save(
                store, eng, model, rank=rank, world_size=world, step=done,
                consumed_sequences=done * cfg.train.global_batch_size,
                extra={"run_id": args.run_id or "", "loss": stats.loss, "eval_loss": eval_loss,
                       "data_cache_key": data.cache_key}, keep_last=cfg.checkpoint.keep_last)
            t_last = time.perf_counter()  # keep checkpoint time out of throughput
            if logger is not None:
                logger.log_metrics({"checkpoint_save_s": seconds}, step=done)
                logger.log_expert_load(history, step=done)
                if preempted:
                    logger.event("preemption_checkpoint", step=done)
            if preempted:
                preempt.handled()
        if args.stop_after_step is not None and done >= args.stop_after_step:
            break
    preempt.close()
    if logger is not None:
        logger.close()


def _report_kernel(cfg: JobConfig, model, rank: int, device: torch.device) -> None:
    """Say once per worker which MoE expert kernel its training runs (see model.kernels)."""
    from model.kernels import select_backend

    dtype = next(model.parameters()).dtype
    backend = select_backend(device, dtype, cfg.model.d_model, cfg.model.ffn_hidden_size)
    print(f"[rank {rank}] MoE expert kernel: {backend} ({device.type}, "
          f"{str(dtype).removeprefix('torch.')})", flush=True)


def _logger(cfg: JobConfig, run_id: Optional[str]):
    if not run_id:
        return None
    from platform.tracking import MetricsLogger

    return MetricsLogger(cfg, run_id)


def _log_start(logger, resumed, layout: Layout, step: int) -> None:
    logger.log_metrics({"world_size": layout.world_size, "expert_parallel": layout.expert_parallel},
                       step=step)
    if resumed is None:
        return
    logger.log_metrics({"checkpoint_load_s": resumed.seconds, "resumed_step": resumed.step},
                       step=step)
    if resumed.state.world_size != layout.world_size:
        logger.event("world_size_change", step=step, previous=resumed.state.world_size,
                     current=layout.world_size, expert_parallel=layout.expert_parallel)
    for bad_step, reason in resumed.skipped:
        logger.event("checkpoint_fallback", step=step, skipped_step=bad_step, reason=reason,
                     used_step=resumed.step)
        log.warning("checkpoint step %d skipped (%s); resumed from step %d",
                    bad_step, reason, resumed.step)
