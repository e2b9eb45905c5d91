"""The metric keys tracking defines, in one place.

The MLflow run page draws a chart per key, so the set of keys is what users
see first; it must not grow with the model. Per-expert loads are therefore
artifacts (platform.tracking.expert_load), and each layer logs two summaries.
Keys the training loop adds on its own (loss, lr, mfu, ...) are listed in the
README's monitoring section.
"""

from __future__ import annotations

# Where a training step's wall time went, in seconds. The worker logs the first three
# every logged step and the fourth at steps that save a checkpoint; the MLflow run page
# groups keys by their prefix, so the breakdown is one section of charts.
TIME_DATA_WAIT = "time/data_wait_s"     # waiting for the next batch (loading, host to device)
TIME_FWD_BWD = "time/fwd_bwd_s"         # forward and backward over all micro-batches
TIME_OPTIMIZER = "time/optimizer_s"     # gradient clipping and the optimizer step
TIME_CHECKPOINT = "time/checkpoint_s"   # training blocked by the save of this step (the stall)
STEP_TIME_KEYS = (TIME_DATA_WAIT, TIME_FWD_BWD, TIME_OPTIMIZER, TIME_CHECKPOINT)

# Per layer, each logged step: the busiest expert's share of the layer's tokens over
# the uniform share 1/E (1: balanced, E: every token on one expert), and the
# coefficient of variation of the shares (0: balanced, sqrt(E - 1): collapsed).
MAX_OVER_UNIFORM = "max_over_uniform"
CV = "cv"
# At each checkpoint: MAX_OVER_UNIFORM's largest value over all layers.
EXPERT_LOAD_MAX_RATIO = "expert_load.max_ratio"

DROPPED_METRIC = "tracking.dropped_metrics"   # points the logger dropped while MLflow was down
EVENT_COUNT_PREFIX = "events."                # events.<name>: how many times the event happened
# MLflow's system metrics (platform.tracking.system, GPU workers) are under "system/".


def expert_load_key(layer: int, stat: str) -> str:
    """`expert_load/layer03/cv`: MAX_OVER_UNIFORM or CV of one layer."""
    return f"expert_load/layer{layer:02d}/{stat}"
