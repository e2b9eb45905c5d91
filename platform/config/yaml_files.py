"""Which YAML file of a job is broken, on which line, and how to fix it.

Hydra and OmegaConf let YAML mistakes out as PyYAML, codec or OS errors with
a stack trace (a `UnicodeDecodeError` does not even name the file). When
composition fails that way, `yaml_problem` turns the error into one Problem
naming the file and line: from the error's own position when it has one,
else by checking the job file and then the group files (conf/<group>/*.yaml)
the way OmegaConf reads them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from platform.config.build import Problem

# Errors that mean "a YAML file could not be read", as Hydra lets them out.
YAML_ERRORS = (yaml.YAMLError, UnicodeDecodeError, OSError)
_MAX_GROUP_FILES = 2000   # the config folder could be any folder: bound the search


def yaml_problem(exc: BaseException, job_file: Path) -> Problem:
    """The file, line and fix for a YAML error raised while composing `job_file`."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return Problem("", _marked(exc))
    for path in _candidates(job_file):
        problem = file_problem(path)
        if problem is not None:
            return problem
    return Problem("", f"cannot read the job's YAML files: {exc}")


def file_problem(path: Path) -> Problem | None:
    """What stops OmegaConf from loading `path` as a config, or None."""
    from omegaconf._utils import get_yaml_loader

    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        return Problem("", f"{path}: cannot read it: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return Problem("", f"{path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8: "
                           "save the file as UTF-8")
    try:
        tree = yaml.load(text, Loader=get_yaml_loader())
    except yaml.MarkedYAMLError as exc:
        return Problem("", _marked(exc, path))
    except yaml.YAMLError as exc:
        return Problem("", f"{path}: not valid YAML: {exc}")
    if tree is not None and not isinstance(tree, (dict, list)):
        return Problem("", f"{path}: holds a single {type(tree).__name__}, not a mapping: "
                           "write the config as `key: value` lines")
    return None


def _candidates(job_file: Path):
    """The job file, then the group files beside it, a bounded number of them."""
    yield job_file
    for i, path in enumerate(sorted(job_file.parent.glob("*/*.y*ml"))):
        if i >= _MAX_GROUP_FILES:
            return
        yield path


def _marked(exc: yaml.MarkedYAMLError, path: Path | None = None) -> str:
    mark = exc.problem_mark
    where = f"{path or mark.name}, line {mark.line + 1}, column {mark.column + 1}"
    problem = (exc.problem or "").strip()
    if "'\\t'" in problem:
        return f"{where}: a tab character; YAML indents with spaces only: replace the tab with spaces"
    if problem.startswith("found duplicate key"):
        key = problem[len("found duplicate key"):].strip()
        return f"{where}: the key '{key}' appears twice in one mapping: keep one of them"
    context = ""
    if exc.context and exc.context_mark is not None:
        context = f" ({exc.context} at line {exc.context_mark.line + 1})"
    return f"{where}: YAML syntax error: {problem}{context}: fix the YAML there"
