"""MLflow tracking for training jobs: one run per job, outage-proof logging, plots.

On the driver, once per submission::

    run_id = start_or_resume_run(cfg, plan=make_plan(cfg).to_json())
    print(run_url(cfg, run_id))
    ...
    finish_run(cfg, run_id, "FINISHED")     # or "FAILED" / "KILLED"

On rank 0 of the training loop::

    tracker = MetricsLogger(cfg, run_id)
    tracker.event("restart", step=resumed_step, attempt=n)      # after resuming
    tracker.log_metrics({"loss": loss, "mfu": mfu}, step)        # every step, never blocks
    loads.add(step, router_fractions)                            # ExpertLoadHistory
    tracker.log_expert_load(loads, step)                         # at each checkpoint
    tracker.close()
"""

from platform.tracking.logger import MetricsLogger
from platform.tracking.plots import ExpertLoadHistory, expert_load_heatmap, figure_png, max_load_ratio
from platform.tracking.run import (
    RunLink, TrackingError, code_version, config_params, finish_run, run_url, start_or_resume_run,
)
from platform.tracking.store import Store, resolve

__all__ = [
    "ExpertLoadHistory", "MetricsLogger", "RunLink", "Store", "TrackingError", "code_version",
    "config_params", "expert_load_heatmap", "figure_png", "finish_run", "max_load_ratio", "resolve",
    "run_url", "start_or_resume_run",
]
