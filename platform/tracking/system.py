"""MLflow system metrics on GPU workers: GPU utilisation and memory next to the loss.

MLflow's `SystemMetricsMonitor` samples in a thread of its own and logs under
`system/` (`system/gpu_0_utilization_percentage`, `..._memory_usage_percentage`,
CPU, disk and network). GPU numbers need NVIDIA's `nvidia-ml-py` (module
`pynvml`), the rest `psutil`; without either, training goes on and a warning
says what is missing. On a machine without CUDA nothing starts: a laptop's
load says nothing about training, and it would add a dozen charts.

MLflow's monitor stops for good at its first failed request (it checks the
run's status every sample), so an MLflow outage ends system metrics for the
rest of that training attempt; the training metrics themselves are buffered
and retried by the logger.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Optional

from platform.config import JobConfig
from platform.tracking.store import fail_fast_http, resolve

log = logging.getLogger("platform.tracking")

SAMPLING_INTERVAL_S = 10.0


def start_system_metrics(cfg: JobConfig, run_id: str, *, on_gpu: Optional[bool] = None,
                         interval_s: float = SAMPLING_INTERVAL_S) -> Optional[Any]:
    """Start MLflow's system-metrics monitor for `run_id`; its `finish()` stops it.

    `on_gpu` (default: whether CUDA is available) false: nothing starts, None
    is returned. Never raises: a monitor that cannot start is a warning. Steps
    continue the run's earlier system metrics, so a restarted job appends.
    """
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    if not on_gpu:
        return None
    try:
        fail_fast_http()
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=resolve(cfg.tracking).tracking_uri)
    except Exception as exc:   # psutil missing, MLflow unreachable: training matters more
        log.warning("MLflow system metrics are off for run %s: %s: %s", run_id,
                    type(exc).__name__, exc)
        return None
    if not any(isinstance(m, (GPUMonitor, ROCMMonitor)) for m in monitor.monitors):
        fix = ("install nvidia-ml-py (module pynvml) on the GPU nodes"
               if importlib.util.find_spec("pynvml") is None
               else "NVML did not start (logger mlflow.system_metrics at DEBUG says why)")
        log.warning("MLflow system metrics of run %s leave out GPU utilisation and memory: %s",
                    run_id, fix)
    monitor.start()
    return monitor
