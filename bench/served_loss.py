"""Held-out loss of a trained checkpoint at each weight format the endpoint can serve.

    python bench/served_loss.py conf/local_tiny.yaml --checkpoint PATH [overrides ...]

PATH is a committed training checkpoint (a `step_*` folder). The held-out
batches are the job's own (`data.eval_fraction` of the prepared corpus, as the
promotion gate reads them), so the numbers are what `promote.gate_weights`
would compare. Prints the loss per format and its cost over fp32 in nats.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--checkpoint", required=True, help="a committed checkpoint folder (step_*)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    import torch

    from model.quant import FORMATS, fp8_supported
    from platform.checkpoint.trainer_state import consolidated_weights
    from platform.config import load_job
    from platform.registry.artifacts import model_from_state_dict
    from platform.registry.evaluate import as_served, heldout_batches, heldout_loss

    cfg = load_job(args.job, args.overrides)
    base = model_from_state_dict(cfg.model, consolidated_weights(args.checkpoint, cfg.model.moe_num_experts))
    batches = heldout_batches(cfg)
    tokens = sum(b[:, 1:].numel() for b in batches)
    print(f"{args.checkpoint}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
          f"{tokens} held-out tokens")
    reference = None
    for fmt in FORMATS:
        if fmt == "fp8" and fp8_supported(torch.device("cpu")):
            print(f"  {fmt:5s} skipped: {fp8_supported(torch.device('cpu'))}")
            continue
        start = time.perf_counter()
        loss = heldout_loss(as_served(copy.deepcopy(base), fmt), batches)
        reference = loss if reference is None else reference
        print(f"  {fmt:5s} held-out loss {loss:.4f}  cost {loss - reference:+.4f} nats  "
              f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
