"""`python -m platform.submit CONFIG [key=value ...] [--dry-run] [--json]`

Composes and validates the job, prints its plan, and (without --dry-run)
hands it to the controller, which provisions nodes, trains, promotes and
tears down.
"""

from __future__ import annotations

import argparse
import json

from platform.errors import UserError, run_cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m platform.submit",
        description="Plan and run a DBRX training job described by a Hydra config.",
    )
    parser.add_argument("config", help="job file, e.g. conf/local_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.lr=1e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--detach", action="store_true",
                        help="submit as a Ray Job on the head and print its id; follow it with "
                             "python -m platform.status|logs|stop JOB_ID")
    return parser.parse_args(argv)


def terraform_preview(cfg) -> str:
    """What provisioning would do: `terraform plan`'s summary for the job's max_nodes, or
    why there is none (e.g. the module's providers cannot be downloaded from here)."""
    from platform.provision.nodes import Provisioner

    address = cfg.cluster.ray_address or f"127.0.0.1:{cfg.cluster.head_port}"
    return Provisioner.for_job(cfg, address).plan_summary(cfg.cluster.max_nodes)


def main(argv: list[str]) -> int:
    from platform.config import load_job
    from platform.plan import make_plan, render

    args = parse_args(argv)
    cfg = load_job(args.config, args.overrides)
    plan = make_plan(cfg)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(render(plan, cfg))
    if not plan.fits:
        raise UserError(f"the job needs {plan.memory_per_gpu_gb:.1f} GB per GPU but "
                        f"cluster.gpu_memory_gb is {plan.memory_limit_gb:.0f}: turn on "
                        "model.activation_checkpointing, lower train.micro_batch_size or "
                        "train.seq_len, or add nodes")
    if args.dry_run:
        if not args.json:
            print(terraform_preview(cfg))
        return 0
    if args.detach:
        from platform.jobs import submit_detached

        job_id = submit_detached(cfg, args.config, args.overrides)
        print(f"submitted job {job_id}\n  python -m platform.status {job_id}\n"
              f"  python -m platform.logs {job_id} --follow\n  python -m platform.stop {job_id}")
        return 0
    from platform.controller.job import Controller

    return Controller(cfg, plan).run()


if __name__ == "__main__":
    run_cli(main)
