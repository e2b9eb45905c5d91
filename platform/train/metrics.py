"""Where a worker's metrics and progress go: MLflow and the progress board on rank 0, nowhere else.

The training loop tells its sink what happened (started, a step, an
evaluation, a checkpoint) and never asks which rank it is on: other ranks get a
`NullSink` whose methods do nothing. The sink decides what is logged and how
often (`train.log_every_steps`), keeps the per-expert load history for the
checkpoint artifacts, and keeps the metric keys few (platform.tracking.keys).
"""

from __future__ import annotations

import logging
from typing import Optional

from platform.config.schema import JobConfig
from platform.layout import Layout
from platform.train.checkpointing import SaveReport
from platform.train.step import StepStats

log = logging.getLogger("platform.train")

CHECKPOINT_DELIVERY_S = 5.0   # the longest a checkpoint waits for its steps' metrics to arrive


class NullSink:
    """A non-reporting rank's sink."""

    def started(self, resumed, layout: Layout, step: int) -> None: ...
    def step(self, step: int, stats: StepStats, *, lr: float, tokens_per_s: float, mfu: float,
             data_wait_s: float, mixture: dict[str, int]) -> None: ...
    def evaluated(self, step: int, eval_loss: float) -> None: ...
    def before_checkpoint(self, step: int) -> None: ...
    def checkpointed(self, step: int, stall_s: float, preempted: bool) -> None: ...
    def checkpoint_done(self, report: SaveReport) -> None: ...
    def close(self) -> None: ...


class MetricsSink(NullSink):
    """Rank 0's sink: MLflow through the outage-proof MetricsLogger, and the progress board."""

    def __init__(self, cfg: JobConfig, total_steps: int, logger=None, progress=None) -> None:
        from platform.tracking import ExpertLoadHistory

        self.cfg, self.total_steps = cfg, total_steps
        self.logger, self.progress = logger, progress
        self.history = ExpertLoadHistory()
        self.world_size = 0

    @classmethod
    def for_rank(cls, rank: int, cfg: JobConfig, total_steps: int, run_id: Optional[str],
                 progress_actor: Optional[str]) -> NullSink:
        if rank != 0:
            return NullSink()
        logger = None
        if run_id:
            from platform.tracking import MetricsLogger

            logger = MetricsLogger(cfg, run_id, system_metrics=True)
        return cls(cfg, total_steps, logger, _progress_board(progress_actor))

    def _log(self, metrics: dict, step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def _event(self, name: str, step: int, **details) -> None:
        if self.logger is not None:
            self.logger.event(name, step=step, **details)

    def started(self, resumed, layout: Layout, step: int) -> None:
        self.world_size = layout.world_size
        self._log({"world_size": layout.world_size, "expert_parallel": layout.expert_parallel}, step)
        if resumed is None:
            return
        self._log({"checkpoint_load_s": resumed.seconds, "resumed_step": resumed.step}, step)
        if resumed.state.world_size != layout.world_size:
            self._event("world_size_change", step, previous=resumed.state.world_size,
                        current=layout.world_size, expert_parallel=layout.expert_parallel)
        for bad_step, reason in resumed.skipped:
            self._event("checkpoint_fallback", step, skipped_step=bad_step, reason=reason,
                        used_step=resumed.step)
            log.warning("checkpoint step %d skipped (%s); resumed from step %d",
                        bad_step, reason, resumed.step)
        # The board hears of trained steps: until one is (or if none is, the job stopped
        # right after resuming) the bar and the job's last line would say step 0.
        if self.progress is not None:
            self.progress.update.remote(step, self.total_steps, resumed.state.extra.get("loss"),
                                        None, layout.world_size)
            if resumed.state.extra.get("eval_loss") is not None:
                self.progress.report_eval.remote(resumed.state.extra["eval_loss"])

    def step(self, step: int, stats: StepStats, *, lr: float, tokens_per_s: float, mfu: float,
             data_wait_s: float, mixture: dict[str, int]) -> None:
        from platform.tracking import (
            TIME_DATA_WAIT, TIME_FWD_BWD, TIME_OPTIMIZER, expert_load_summary,
        )

        fractions = stats.expert_fractions().numpy()
        self.history.add(step, fractions)
        if step % self.cfg.train.log_every_steps == 0 or step == self.total_steps:
            batch = self.cfg.train.global_batch_size
            self._log({"loss": stats.loss, "lm_loss": stats.lm_loss, "lb_loss": stats.lb_loss,
                       "z_loss": stats.z_loss, "lr": lr, "grad_norm": stats.grad_norm,
                       "tokens_per_s": tokens_per_s, "mfu": mfu, "world_size": self.world_size,
                       "tokens_seen": step * batch * self.cfg.train.seq_len,
                       TIME_DATA_WAIT: data_wait_s, TIME_FWD_BWD: stats.fwd_bwd_s,
                       TIME_OPTIMIZER: stats.optimizer_s,
                       **expert_load_summary(fractions),
                       **{f"mixture/{name}": n / batch for name, n in mixture.items()}}, step)
        if self.progress is not None:
            self.progress.update.remote(step, self.total_steps, stats.loss, tokens_per_s,
                                        self.world_size)

    def evaluated(self, step: int, eval_loss: float) -> None:
        self._log({"eval_loss": eval_loss}, step)
        if self.progress is not None:
            self.progress.report_eval.remote(eval_loss)

    def before_checkpoint(self, step: int) -> None:
        """The steps up to a checkpoint are never trained again once it is committed: their
        metrics reach MLflow before it is taken, or a worker that dies after the commit but
        within the logger's batching interval would leave a hole in the curves for good.
        While MLflow is unreachable nothing waits (the points stay buffered)."""
        if self.logger is not None and not self.logger.deliver_now(CHECKPOINT_DELIVERY_S):
            log.info("metrics up to step %d not yet in MLflow when its checkpoint was taken", step)

    def checkpointed(self, step: int, stall_s: float, preempted: bool) -> None:
        """A checkpoint of `step` was taken; training waited `stall_s` for it (the write goes on)."""
        from platform.tracking import TIME_CHECKPOINT

        self._log({TIME_CHECKPOINT: stall_s}, step)
        if self.logger is not None:
            self.logger.log_expert_load(self.history, step=step)
        if preempted:
            self._event("preemption_checkpoint", step)

    def checkpoint_done(self, report: SaveReport) -> None:
        """A save ended: what it cost, or, if it failed, a `checkpoint_failed` event."""
        if report.error is not None:
            self._event("checkpoint_failed", report.step, error=report.error)
            return
        self._log({"checkpoint/total_s": report.total_s, "checkpoint/bytes": report.bytes,
                   "checkpoint/rank_mb_per_s": report.rank_mb_per_s}, report.step)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


def _progress_board(name: Optional[str]):
    """The driver's named progress actor, or None (no driver board, e.g. in tests)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        return None
