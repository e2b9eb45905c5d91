"""Turn a composed config tree into the typed, frozen `JobConfig`.

OmegaConf's structured configs stop at the first bad key; a user fixing a job
file wants every problem at once. This walker checks the whole tree against
the dataclass schema and collects each unknown key, wrong type and missing
value with its dotted path, then `validate` adds the cross-field checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from platform.config.limits import items_limit
from platform.config.rules import describe, text_problem
from platform.config.schema import SECRET_KEYS


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin in (list, typing.List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, typing.Dict):
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _describe(path: str, value: Any) -> str:
    """The value for a message; a secret is described by its type only, never echoed."""
    if path in SECRET_KEYS:
        return f"a hidden {type(value).__name__} value"
    return describe(value)


def pattern(path: str) -> str:
    """`path` with list indexes generalised: data.sources[3].weight -> data.sources[].weight."""
    return re.sub(r"\[\d+\]", "[]", path)


def _too_many(value: Any, path: str, problems: list[Problem]) -> bool:
    """Whether a list or mapping is over its length cap (checked before its items are)."""
    limit = items_limit(pattern(path))
    if len(value) <= limit:
        return False
    problems.append(Problem(path, f"has {len(value)} entries; at most {limit} are allowed"))
    return True


def build(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Convert `value` to type `tp`, appending a Problem for each part that does not fit.

    Parts that fail are left out (a field falls back to its default), so the
    result is as complete as possible; _MISSING when nothing can be built.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # A union of scalars (checkpoint.every_steps: an integer or "auto") takes the first
        # type the value has; validate checks which strings mean something.
        fits = [a for a in inner if len(inner) == 1 or _is_scalar_of(a, value)]
        if value is None or not fits:
            problems.append(Problem(path, f"must be {_type_name(tp)}, got {_describe(path, value)}"))
            return _MISSING
        return build(fits[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(path, f"must be {_type_name(tp)}, got {_describe(path, value)}"))
            return _MISSING
        if _too_many(value, path, problems):
            return _MISSING
        (item_tp,) = typing.get_args(tp)
        items = [build(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return [i for i in items if i is not _MISSING]
    if origin in (dict, typing.Dict):
        if not isinstance(value, Mapping):
            problems.append(Problem(path, f"must be {_type_name(tp)}, got {_describe(path, value)}"))
            return _MISSING
        if _too_many(value, path, problems):
            return _MISSING
        _, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            key_problem = text_problem(str(k))
            if key_problem:
                problems.append(Problem(path, f"key {describe(str(k))} {key_problem}"))
            else:
                out[str(k)] = build(val_tp, v, f"{path}.{k}", problems)
        return {k: v for k, v in out.items() if v is not _MISSING}
    if not _is_scalar_of(tp, value):
        problems.append(Problem(path, f"must be {_type_name(tp)}, got {_describe(path, value)}"))
        return _MISSING
    problem = _scalar_problem(tp, value)
    if problem:
        problems.append(Problem(path, problem))
        return _MISSING
    return float(value) if tp is float else value


def _is_scalar_of(tp: Any, value: Any) -> bool:
    """Whether `value` is a scalar of type `tp` (an int counts as a float; a bool as neither)."""
    return (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )


def _scalar_problem(tp: Any, value: Any) -> str | None:
    """What makes a well-typed scalar unusable anywhere: an integer too large for a float,
    an over-long string or one with control characters. (Ranges, inf and nan: limits.Range.)"""
    if tp is float and isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return "must be a finite number, got an integer too large for a float"
    if tp is str:
        return text_problem(value)
    return None


def _build_dataclass(cls: type, value: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"must be a mapping of {cls.__name__} fields, "
                                      f"got {_describe(path, value)}"))
        return _MISSING
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else \
                f"known keys: {', '.join(sorted(fields))}"
            problems.append(Problem(f"{prefix}{key}", f"unknown key; {hint}"))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in value:
            converted = build(hints[name], value[name], f"{prefix}{name}", problems)
            if converted is not _MISSING:
                kwargs[name] = converted
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(f"{prefix}{name}", "is required; set it in the job file "
                                                     "or on the command line"))
    try:
        # A field that failed falls back to its default, so that checks on the
        # rest of the config still run; the caller knows it failed from `problems`.
        return cls(**kwargs)
    except TypeError:  # a required field is missing
        return _MISSING


def is_missing(value: Any) -> bool:
    return value is _MISSING
