"""`python -m platform.promote CONFIG [key=value ...] [--step N] [--alias A] [--no-gate] [--json]`

Registers a committed checkpoint of the job (default: its latest valid one)
as a version of `promote.registered_model` in the MLflow Model Registry and
points the alias at it; see platform.registry.promotion. A gate refusal or a
missing checkpoint ends with one message and exit code 1; a bad argument or
config, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging

from platform.errors import ArgumentParser, run_cli


def _step(text: str) -> int:
    """--step: a whole number in limits.STEP, checked before anything opens a store."""
    from platform.config.limits import STEP
    from platform.config.rules import describe

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{describe(text)} is not a whole number") from None
    problem = STEP.problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"a checkpoint step {problem}")
    return value


def _alias(text: str) -> str:
    """--alias: an MLflow alias, by the same rule as promote.alias in a config."""
    from platform.config.rules import name_problem

    problem = name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags and Hydra overrides in any order."""
    parser = ArgumentParser(
        prog="python -m platform.promote",
        description="Register a trained checkpoint in the MLflow Model Registry and move an alias to it.")
    parser.add_argument("config", help="job file, e.g. conf/local_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. promote.registered_model=dbrx")
    parser.add_argument("--step", type=_step, help="checkpoint step (default: the latest valid one)")
    parser.add_argument("--alias", type=_alias, help="alias to move (default: promote.alias)")
    parser.add_argument("--no-gate", action="store_true",
                        help="promote even if the held-out loss is worse than the alias's version")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    from platform.config import load_job
    from platform.registry import promote

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_job(args.config, args.overrides)
    result = promote(cfg, step=args.step, alias=args.alias, gate=False if args.no_gate else None)
    print(json.dumps(result.to_json()) if args.json else result)
    return 0


if __name__ == "__main__":
    run_cli(main)
