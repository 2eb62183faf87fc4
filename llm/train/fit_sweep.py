"""A grid of dry runs (llm/train/dry_run.py): which meshes, remat policies, batch sizes and loss chunkings of a
config fit a device kind's memory, and how fast each would step.

A grid is `;`-separated axes, each `KEY=VALUE,VALUE,...`, where KEY is a dotted config key (`mesh_shape`,
`model.remat_policy`, `train.batch_size`, ...) and each VALUE a Python literal (a bare word is a string); commas
inside parentheses or brackets belong to the value, so a mesh shape is written as it is in a config:

    mesh_shape=(1,-1,1),(1,-1,2);model.remat_policy=none,full;train.batch_size=8,16;train.loss_chunk_size=0,512

Every combination of the axes is one point (here 2 x 2 x 2 x 2 = 16).
"""

from __future__ import annotations

import ast
import itertools
from typing import Any

import ml_collections

from llm import config_validation
from llm.train import dry_run

Grid = list[tuple[str, list[Any]]]


def parse_grid(text: str) -> Grid:
    """[(key, values)] of a grid string (syntax in the module docstring); ValueError naming a malformed axis."""
    grid = []
    for axis in filter(str.strip, text.split(";")):
        key, sep, values = axis.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"Grid axis {axis.strip()!r} is not KEY=VALUE,VALUE,...")
        grid.append((key.strip(), [_literal(v) for v in _split_top_level(values)]))
    if not grid:
        raise ValueError("The grid is empty: give at least one KEY=VALUE,... axis.")
    return grid


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside parentheses and brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def with_overrides(config: ml_collections.ConfigDict, point: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted key of `point` set; ConfigError naming an unknown key or a wrong type."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in point.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node.get(section)
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise config_validation.ConfigError(f"Grid key {key!r} is not a config key.")
        try:
            node[name] = value
        except TypeError as error:
            raise config_validation.ConfigError(f"Grid key {key!r}: {error}") from None
    return config


def sweep(config: ml_collections.ConfigDict, grid: Grid, device_kind: str) -> list[dict[str, Any]]:
    """One row per grid point: the point, memory per device, fits, estimated step time and tokens/s, or the error
    that point's config raised (e.g. a batch that does not divide the mesh)."""
    keys = [key for key, _ in grid]
    rows = []
    for values in itertools.product(*(values for _, values in grid)):
        point = dict(zip(keys, values, strict=True))
        try:
            report = dry_run.dry_run(with_overrides(config, point), device_kind)
        except ValueError as error:  # ConfigError included: the point is impossible, the others may not be.
            rows.append({"point": point, "error": str(error)})
            continue
        estimate = report["estimate"]
        rows.append(
            {
                "point": point,
                "memory_per_device_bytes": report["memory_per_device"]["total"],
                "fits": estimate["fits"],
                "step_time_s": estimate["step_time_s"],
                "tokens_per_s": estimate["tokens_per_s"],
            }
        )
    return rows


def format_sweep(rows: list[dict[str, Any]], device_kind: str) -> str:
    """The rows as a table, one line per point, the last columns the verdict."""
    keys = list(rows[0]["point"]) if rows else []
    widths = [max(len(key), *(len(str(row["point"][key])) for row in rows)) for key in keys]
    header = [f"{key:<{w}}" for key, w in zip(keys, widths, strict=True)]
    lines = ["  ".join([*header, "GiB/device", "fits", "step ms", "tokens/s"])]
    for row in rows:
        cells = [f"{str(row['point'][key]):<{w}}" for key, w in zip(keys, widths, strict=True)]
        if "error" in row:
            cells.append(f"error: {row['error']}")
        else:
            cells += [
                f"{row['memory_per_device_bytes'] / 2**30:>10.3f}",
                f"{'yes' if row['fits'] else 'NO':>4}",
                f"{row['step_time_s'] * 1e3:>7.4g}",
                f"{row['tokens_per_s']:>8,.0f}",
            ]
        lines.append("  ".join(cells))
    lines.append(f"(on {device_kind}; {dry_run.ESTIMATE_NOTE})")
    return "\n".join(lines)
