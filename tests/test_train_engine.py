"""How a worker imports DeepSpeed: without MLflow (seconds per rank at start), which stays usable."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from platform.train.engine import import_deepspeed
deepspeed = import_deepspeed()
from deepspeed.autotuning import autotuner
seen = {"deepspeed": "deepspeed" in sys.modules, "mlflow_loaded": "mlflow" in sys.modules,
        "autotuner_mlflow": autotuner.has_mlflow}
from mlflow.entities import Metric          # what the reporting rank's logger imports later
seen["mlflow_after"] = Metric("loss", 1.0, 0, 1).key
print(json.dumps(seen))
"""


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "deepspeed": True, "mlflow_loaded": False, "autotuner_mlflow": False, "mlflow_after": "loss"}
