"""Tensor keys of a trainer checkpoint: global names, and how pieces of one tensor are named.

Every key starts with a parameter's global name, so a checkpoint loads at any
world size. A tensor stored whole keeps that name (`blocks.0.attn.Wqkv.weight`,
Adam's moments add `::exp_avg` / `::exp_avg_sq`). Two kinds of pieces:

- one expert of a stacked expert parameter: `<name>.expert0007`;
- a row range [a, b) of a dense parameter, cut so that every rank writes a
  fair share (platform.checkpoint.placement): `<name>.rows000000000-000012345`.

Readers join row ranges back into whole tensors (`logical_keys`), so they read
checkpoints written before dense state was cut (whole keys only) unchanged.
"""

from __future__ import annotations

import re
from typing import Iterable

_ROWS_RE = re.compile(r"(?P<base>.+)\.rows(?P<start>\d+)-(?P<end>\d+)")


def expert_key(name: str, expert: int) -> str:
    """The key of expert `expert`'s rows of the stacked expert parameter `name`."""
    return f"{name}.expert{expert:04d}"


def rows_key(name: str, start: int, end: int) -> str:
    """The key of rows [start, end) of the dense tensor `name`."""
    return f"{name}.rows{start:09d}-{end:09d}"


def logical_keys(stored: Iterable[str]) -> dict[str, list[str]]:
    """Logical key (a whole tensor, or one expert) -> its stored keys in row order.

    Raises ValueError if the row ranges of a tensor do not tile it from row 0
    without gaps or overlaps (its last row is checked against the model's
    shape by the loader).
    """
    out: dict[str, list[str]] = {}
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for key in stored:
        match = _ROWS_RE.fullmatch(key)
        if match is None:
            out[key] = [key]
        else:
            ranges.setdefault(match["base"], []).append((int(match["start"]), int(match["end"]), key))
    for base, parts in ranges.items():
        parts.sort()
        expected = 0
        for start, end, key in parts:
            if start != expected or end <= start:
                raise ValueError(f"row ranges of {base!r} do not tile it: {key!r} after row {expected}")
            expected = end
        if base in out:
            raise ValueError(f"{base!r} is stored both whole and in row ranges")
        out[base] = [key for _, _, key in parts]
    return out
