"""`python -m platform.submit CONFIG [key=value ...] [--dry-run] [--json]`

Composes and validates the job, prints its plan, and (without --dry-run)
hands it to the controller, which provisions nodes, trains, promotes and
tears down. A job that cannot run (an invalid config, a model that does not
fit a worker's memory, a Terraform plan that rejects the job's module) ends
with one message and exit code 2 before anything is provisioned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from platform.errors import ArgumentParser, InputError, run_cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags and Hydra overrides in any order (`CONFIG --dry-run train.lr=1e-3` too)."""
    parser = ArgumentParser(
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
    return parser.parse_intermixed_args(argv)


def terraform_preview(cfg) -> str:
    """What provisioning would do: `terraform plan`'s summary for the job's max_nodes, or
    why there is none (e.g. the module's providers cannot be downloaded from here).
    Terraform rejecting the job's own module is an input error (exit 2)."""
    from platform.provision.errors import ProvisionError
    from platform.provision.nodes import Provisioner

    address = cfg.cluster.ray_address or f"127.0.0.1:{cfg.cluster.head_port}"
    try:
        return Provisioner.for_job(cfg, address).plan_summary(cfg.cluster.max_nodes)
    except ProvisionError as exc:
        raise InputError(f"{exc}\n  fix the cluster settings (cluster.*, cluster.terraform_vars) "
                         "that the error names") from None


def main(argv: list[str]) -> int:
    from platform.config import ConfigError, load_job
    from platform.plan import fit_problem, make_plan, render

    args = parse_args(argv)
    cfg = load_job(args.config, args.overrides)
    plan = make_plan(cfg)
    problem = fit_problem(plan)
    if args.json:   # one JSON object; a dry-run adds what Terraform would do
        report = plan.to_json()
        if args.dry_run and not problem:
            report["terraform_plan"] = terraform_preview(cfg)
        print(json.dumps(report, indent=2))
    else:
        print(render(plan, cfg))
    if problem:
        raise ConfigError([problem], str(Path(args.config).expanduser().resolve()))
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
