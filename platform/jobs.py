"""Detached jobs: `submit --detach` hands the job to Ray's job server on the head.

The submitted entrypoint is the same `python -m platform.submit` command,
run on the head against the head's cluster; `python -m platform.status|logs|stop
JOB_ID` talk to the same job server. Where each job was sent is remembered in
the state directory, so the commands need only the job id.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path


from platform.config import state_dir
from platform.config.rules import name_problem
from platform.config.schema import JobConfig
from platform.errors import InputError, UserError

# What a job record must hold; anything else is a corrupt record, not a KeyError.
_RECORD_KEYS = ("job_id", "job_name", "dashboard")


def _records() -> Path:
    return Path(state_dir()) / "jobs"


def _client(dashboard_url: str):
    from ray.job_submission import JobSubmissionClient

    from platform.provision.head import enable_token_auth_in_process

    enable_token_auth_in_process()
    try:
        return JobSubmissionClient(dashboard_url)
    except Exception as exc:
        raise UserError(f"cannot reach the Ray job server at {dashboard_url}: {exc}") from None


def submit_detached(cfg: JobConfig, config_path: str, overrides: list[str]) -> str:
    """Start (or reuse) the head, submit the job to it, return the Ray job id."""
    from platform.provision.head import LocalHead

    c = cfg.cluster
    if c.ray_address:
        raise UserError("--detach submits to the embedded head; with cluster.ray_address set, use "
                        "`ray job submit` against that cluster's dashboard")
    from platform.provision.head import port_open

    started_here = not port_open("127.0.0.1", c.head_port)
    head = LocalHead(port=c.head_port, dashboard_port=c.dashboard_port).start()
    command = [sys.executable, "-m", "platform.submit", str(Path(config_path).resolve()),
               *overrides, f"cluster.ray_address={head.address}"]
    env = {k: os.environ[k] for k in ("DBRX_PLATFORM_HOME", "AWS_ENDPOINT_URL_S3",
                                      "MLFLOW_TRACKING_URI") if k in os.environ}
    try:
        job_id = _submit_when_ready(_client(head.dashboard_url), dict(
            entrypoint=" ".join(shlex.quote(x) for x in command),
            runtime_env={"env_vars": env} if env else None,
            metadata={"job_name": cfg.name},
        ))
    except BaseException:
        if started_here:    # nothing runs on a head started for this submission: stop it
            head.stop()
        raise
    _records().mkdir(parents=True, exist_ok=True)
    (_records() / f"{job_id}.json").write_text(json.dumps(
        {"job_id": job_id, "job_name": cfg.name, "dashboard": head.dashboard_url}))
    return job_id


def _submit_when_ready(client, request: dict, timeout_s: float = 120.0) -> str:
    """submit_job, waiting out a fresh head whose job agent is not up yet (Ray answers
    "No available agent to submit job" for a few seconds after the head starts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**request)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise UserError(f"the Ray job server did not take the job: {exc}") from None
            time.sleep(1.0)


def lookup(job_id: str) -> dict:
    """The record `submit --detach` wrote for `job_id`, checked: the id names a file."""
    problem = name_problem(job_id)
    if problem:
        raise InputError(f"job id {problem}; give the id that submit --detach printed "
                         "(e.g. raysubmit_...)")
    path = _records() / f"{job_id}.json"
    if not path.is_file():
        known = sorted(p.stem for p in _records().glob("*.json")) if _records().is_dir() else []
        raise UserError(f"no detached job {job_id!r} was submitted from this machine"
                        + (f"; known: {', '.join(known[:20])}" if known else ""))
    return _read_record(path)


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        record, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "it is not a JSON object"
    if isinstance(record, dict):
        missing = [k for k in _RECORD_KEYS if not isinstance(record.get(k), str) or not record[k]]
        if not missing:
            return record
        why = f"it lacks {', '.join(missing)}"
    raise UserError(f"the job record {path} is corrupt ({why}); delete it, and follow the job in "
                    "the Ray dashboard (`ray job list`) instead")


def status(job_id: str) -> str:
    record = lookup(job_id)
    return str(_client(record["dashboard"]).get_job_status(job_id))


def logs(job_id: str, follow: bool = False) -> None:
    record = lookup(job_id)
    client = _client(record["dashboard"])
    if not follow:
        sys.stdout.write(client.get_job_logs(job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def stop(job_id: str) -> bool:
    record = lookup(job_id)
    return bool(_client(record["dashboard"]).stop_job(job_id))


def cli(kind: str, argv: list[str]) -> int:
    from platform.errors import ArgumentParser

    parser = ArgumentParser(prog=f"python -m platform.{kind}",
                            description=f"{kind.capitalize()} a job started with submit --detach.")
    parser.add_argument("job_id")
    if kind == "logs":
        parser.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    args = parser.parse_args(argv)
    if kind == "status":
        print(status(args.job_id))
    elif kind == "logs":
        logs(args.job_id, args.follow)
    else:
        print("stop requested" if stop(args.job_id) else "the job had already ended")
    return 0


def entry(kind: str) -> None:
    from platform.errors import run_cli

    run_cli(lambda argv: cli(kind, argv))


