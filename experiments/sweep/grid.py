"""Grid combinators for sweep configs (`configs/sweeps/<name>.py`).

A sweep file defines `get_sweep(variant: str) -> Sweep`. Points are dicts of
dotted config keys to values, built with `axis`, `product`, `zip_` and
`derive`:

  points = derive(product(axis("moe.num_experts", [4, 8]),
                          axis("train.lr", [1e-3, 3e-3])),
                  lambda p: {"train.steps": 1000 // p["moe.num_experts"]})
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from typing import Any, Callable

import ml_collections

from moejax.checks import ConfigError
from moejax.validation import validate

Point = dict[str, Any]


def axis(key: str, values) -> list[Point]:
  """One swept key: [{key: v} for v in values]."""
  values = list(values)
  if not values:
    raise ValueError(f"axis({key!r}) has no values")
  return [{key: v} for v in values]


def product(*axes: list[Point]) -> list[Point]:
  """Every combination of one point from each axis (later axes vary fastest)."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip_(*axes: list[Point]) -> list[Point]:
  """The i-th points of all axes merged; all axes must have the same length."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f"zip_ needs axes of equal length, got lengths {[len(a) for a in axes]}")
  return [_merge(combo) for combo in zip(*axes)]


def derive(points: list[Point], fn: Callable[[Point], Point]) -> list[Point]:
  """Adds per-point derived values, e.g. steps from a FLOP budget."""
  return [{**p, **fn(p)} for p in points]


def _merge(points) -> Point:
  out: Point = {}
  for p in points:
    for k, v in p.items():
      if k in out and out[k] != v:
        raise ValueError(f"sweep key {k!r} set twice in one point ({out[k]!r} and {v!r})")
      out[k] = v
  return out


def apply(base: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """A copy of `base` with the point's dotted keys set; unknown keys fail.

  Keys starting with "_" are labels (e.g. "_family"): recorded in
  results.csv, not applied to the config.
  """
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in point.items():
    if key.startswith("_"):
      continue
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise ConfigError(f"unknown sweep key {key!r}: {p!r} is not a config group")
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"unknown sweep key {key!r}; allowed keys here: {sorted(node.keys())}")
    if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"sweep key {key!r}={value!r}: {e}") from None
  return cfg


def point_name(point: Point) -> str:
  """A stable, filesystem-safe run directory name for a point.

  A point that sets the config's `name` is named by it; otherwise by its
  sorted key=value pairs.
  """
  if not point:
    return "base"
  if isinstance(point.get("name"), str):
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", point["name"])
  slug = "__".join(f"{k}={_fmt(v)}" for k, v in sorted(point.items()))
  slug = re.sub(r"[^A-Za-z0-9_.=+-]", "-", slug)
  if len(slug) > 100:
    digest = hashlib.sha1(slug.encode()).hexdigest()[:10]
    slug = f"{slug[:88]}-{digest}"
  return slug


def _fmt(v: Any) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass
class Sweep:
  """A base training config and the points (overrides) to run."""

  name: str
  base: ml_collections.ConfigDict
  points: list[Point]

  def configs(self) -> list[tuple[str, Point, ml_collections.ConfigDict]]:
    """(run name, point, validated config) for every point; fails before any run."""
    out, seen = [], {}
    for point in self.points:
      name = point_name(point)
      if name in seen:
        raise ValueError(f"sweep {self.name!r}: points {seen[name]} and {point} "
                         f"share the run name {name!r} (duplicate point?)")
      seen[name] = point
      cfg = apply(self.base, point)
      try:
        validate(cfg)
      except ConfigError as e:
        raise ConfigError(f"sweep {self.name!r}, point {point}: {e}") from None
      out.append((name, point, cfg))
    return out
