"""Compose a job file with Hydra and return the validated `JobConfig`.

`load_job("conf/local_tiny.yaml", ["train.lr=1e-3"])` is the only way the
platform reads a job: Hydra composes the groups and applies `key=value`
overrides, OmegaConf resolves interpolations, `build` types the tree and
`validate` checks combinations. Any problem raises one `ConfigError` that
lists them all.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sysconfig
import typing
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from platform.config.build import Problem, build, is_missing
from platform.config.limits import MAX_FILE_BYTES
from platform.config.rules import describe
from platform.config.schema import SECRET_KEYS, JobConfig
from platform.config.validate import validate
from platform.config.yaml_files import YAML_ERRORS, yaml_problem
from platform.errors import InputError, clip, redact


class ConfigError(InputError):
    """A job config that cannot run (exit code 2); `str()` is the message shown to users."""

    def __init__(self, problems: Sequence[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" in {self.source}" if self.source else ""
        n = len(self.problems)
        head = f"invalid job config{where}: {n} problem{'s' if n != 1 else ''}"
        return clip("\n".join([head] + [f"  - {p}" for p in self.problems]))


def state_dir() -> str:
    """Where the embedded defaults keep their files (MLflow DB, checkpoints, Terraform state)."""
    return os.path.expanduser(os.environ.get("DBRX_PLATFORM_HOME", "~/.dbrx-platform"))


def _pkgdir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {name!r} is not installed")
    return list(spec.submodule_search_locations)[0]


def _register_resolvers() -> None:
    resolvers = {
        "stdlib": lambda: sysconfig.get_paths()["stdlib"],
        "pkgdir": _pkgdir,
        "state_dir": state_dir,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_UNKNOWN_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def _in_schema(key: str) -> bool:
    """Whether a dotted key names a field of the schema (the job files may omit defaults)."""
    tp: Any = JobConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return typing.get_origin(tp) in (dict, typing.Dict)
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return True


def _hide_secrets(text: str, overrides: list[str]) -> str:
    """`text` without the values of secret overrides (Hydra's errors quote them bare)."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") in SECRET_KEYS and value:
            text = text.replace(value, "***")
    return text


def _override_problem(exc: Exception, overrides: list[str]) -> tuple[Problem | None, int | None]:
    """Hydra's composition error as a Problem (None: retry, the override was
    repaired in place), and the index of the override at fault."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines())
    text = _hide_secrets(text.split(" Config search path:")[0], overrides)
    match = _UNKNOWN_OVERRIDE.search(text)
    if match:
        key = match.group(1)
        for i, o in enumerate(overrides):
            if o.split("=", 1)[0].lstrip("+~") == key:
                if _in_schema(key) and not o.startswith("+"):
                    overrides[i] = "+" + o   # a schema field the YAML leaves at its default
                    return None, None
                return Problem(describe(key)[1:-1], f"unknown key (override {describe(o)}); "
                                                    f"check the spelling, or write "
                                                    f"+{describe(o)[1:-1]} to add a new key"), i
    for i, o in enumerate(overrides):
        if o == getattr(exc, "override", None) or o in text or o.split("=", 1)[0] in text:
            return Problem("", f"override {describe(redact(o))}: {text}"), i
    return Problem("", text), None


def _compose(path: Path, overrides: Sequence[str]) -> tuple[Any, list[Problem]]:
    """Compose with Hydra; a bad override is reported and dropped so the rest is checked too."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    remaining, problems = list(overrides), []
    while True:
        try:
            with initialize_config_dir(config_dir=str(path.parent), version_base="1.3",
                                       job_name="dbrx"):
                cfg = compose(config_name=path.stem, overrides=remaining)
            break
        except YAML_ERRORS as exc:   # a broken job or group file: say which, where, and the fix
            raise ConfigError([*problems, yaml_problem(exc, path)], str(path)) from None
        except (HydraException, OmegaConfBaseException) as exc:
            problem, index = _override_problem(exc, remaining)
            if problem is None:
                continue
            problems.append(problem)
            if index is None:
                raise ConfigError(problems, str(path)) from None
            del remaining[index]
    try:
        return OmegaConf.to_container(cfg, resolve=True), problems
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        problems.append(Problem(str(key), str(exc).splitlines()[0]))
        raise ConfigError(problems, str(path)) from None


def load_job(path: str | os.PathLike, overrides: Sequence[str] = ()) -> JobConfig:
    """The validated job config of `path` with Hydra `key=value` overrides applied."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError([Problem("", f"config file {path} not found")], str(path))
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError([Problem("", f"{path.name} is not a .yaml job file")], str(path))
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError([Problem("", f"{path.name} is {path.stat().st_size} bytes; a job file "
                                       f"holds at most {MAX_FILE_BYTES}")], str(path))
    _register_resolvers()
    tree, problems = _compose(path, overrides)
    tree.pop("hydra", None)
    cfg = build(JobConfig, tree, "", problems)
    if not is_missing(cfg):
        # Cross-field checks skip the groups that already failed to type-check:
        # their values fell back to defaults and would mislead.
        broken = {p.path.split(".")[0].split("[")[0] for p in problems}
        problems.extend(p for p in validate(cfg) if p.path.split(".")[0].split("[")[0] not in broken)
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def to_dict(cfg: JobConfig, redact: bool = True) -> dict:
    """The config as plain data, secrets replaced by '***' unless `redact` is False."""
    import dataclasses

    tree = dataclasses.asdict(cfg)
    if redact:
        for key in SECRET_KEYS:
            group, _, leaf = key.partition(".")
            if tree.get(group, {}).get(leaf) is not None:
                tree[group][leaf] = "***"
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 3e-4, ...}: the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out
