"""MLflow tracking for training jobs: one run per job, outage-proof logging, plots.

On the driver, once per submission::

    run_id = start_or_resume_run(cfg, plan=make_plan(cfg).to_json())
    print(run_url(cfg, run_id))
    ...
    finish_run(cfg, run_id, "FINISHED")     # or "FAILED" / "KILLED"

On rank 0 of the training loop::

    tracker = MetricsLogger(cfg, run_id, system_metrics=True)   # + GPU utilisation on CUDA
    tracker.event("restart", step=resumed_step, attempt=n)      # after resuming
    loads.add(step, router_fractions)                            # ExpertLoadHistory
    tracker.log_metrics({"loss": loss, TIME_FWD_BWD: seconds,    # every step, never blocks
                         **expert_load_summary(router_fractions)}, step)
    tracker.log_expert_load(loads, step)                         # at each checkpoint
    tracker.close()

Metric keys: platform.tracking.keys; per-expert detail: platform.tracking.expert_load.
"""

from platform.tracking.expert_load import expert_load_summary, expert_load_table
from platform.tracking.keys import (
    STEP_TIME_KEYS, TIME_CHECKPOINT, TIME_DATA_WAIT, TIME_FWD_BWD, TIME_OPTIMIZER,
)
from platform.tracking.logger import MetricsLogger
from platform.tracking.plots import ExpertLoadHistory, expert_load_heatmap, figure_png, max_load_ratio
from platform.tracking.run import (
    RunLink, TrackingError, code_version, config_params, finish_run, run_url, start_or_resume_run,
)
from platform.tracking.store import Store, resolve
from platform.tracking.system import start_system_metrics

__all__ = [
    "ExpertLoadHistory", "MetricsLogger", "RunLink", "STEP_TIME_KEYS", "Store", "TIME_CHECKPOINT",
    "TIME_DATA_WAIT", "TIME_FWD_BWD", "TIME_OPTIMIZER", "TrackingError", "code_version",
    "config_params", "expert_load_heatmap", "expert_load_summary", "expert_load_table", "figure_png",
    "finish_run", "max_load_ratio", "resolve", "run_url", "start_or_resume_run",
    "start_system_metrics",
]
