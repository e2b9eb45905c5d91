"""`python -m platform.serve CONFIG [key=value ...] [--alias A | --version V | --checkpoint PATH] [--dry-run]`

Starts the OpenAI-compatible endpoint (platform.serving) for the job's
registered model on serve.host:serve.port (127.0.0.1 unless configured),
prints its base URL and serves until Ctrl-C or SIGTERM, which stop it the
same way: in-flight requests finish, then every process it started ends. With
an alias (the default is serve.model_alias) replicas follow it: promoting a
new version switches the endpoint over without failing requests.

--dry-run starts nothing: it prints what one device of a replica holds
(weights at serve.weights, 1/serve.devices_per_replica of the experts, the KV
cache) against the device's memory, and exits 2 naming the key to change when
it does not fit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from platform.errors import ArgumentParser, run_cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags and Hydra overrides in any order."""
    parser = ArgumentParser(prog="python -m platform.serve",
                            description="Serve a job's model over the OpenAI HTTP API.")
    parser.add_argument("config", help="job file, e.g. conf/local_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. serve.port=8080")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", help="registry alias to serve and follow (default: serve.model_alias)")
    which.add_argument("--version", help="registry version to serve")
    which.add_argument("--checkpoint", help="local folder: a version / HF export or a training checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the memory one device of a replica needs, check it fits, and stop")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    # Ray is imported by start_serving, not here: a local instance's network setting is read then.
    from platform.config import load_job
    from platform.serving import start_serving

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_job(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM stops like Ctrl-C
    serving = None
    try:
        serving = start_serving(cfg, alias=args.alias, version=args.version, checkpoint=args.checkpoint)
        key = " (Authorization: Bearer $DBRX_SERVE_API_KEY)" if cfg.serve.api_key else ""
        print(f"serving {serving.source.describe()} as model {serving.model!r}\n"
              f"OpenAI base URL: {serving.base_url}{key}\nCtrl-C to stop", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a repeated SIGTERM must not cut the stop short
        print("stopping", file=sys.stderr, flush=True)
        if serving is not None:
            serving.shutdown()
    return 0


def dry_run(cfg) -> int:
    """Print the per-device memory plan (platform.serving.memory); exit 2 when it does not fit."""
    from platform.errors import InputError
    from platform.serving.memory import fit_problem, render, serve_memory

    mem = serve_memory(cfg)
    print(render(mem), flush=True)
    problem = fit_problem(mem, cfg)
    if problem:
        raise InputError(problem)
    return 0


if __name__ == "__main__":
    run_cli(main)
