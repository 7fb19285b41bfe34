"""Training-time schedules: values that follow the optimizer step (k ramps, temperatures,
loss weights).

One mechanism for all of them. A `Schedule` moves a value from `start` to
`end` between steps `begin` and `stop` by a `shape`, and holds it outside
that window. Its value at step n is a pure function of n, the step counter
of the training state, so a resumed run (which restores the counter) gets
exactly the values of an uninterrupted one, and a checkpoint needs no
schedule state of its own.

Two sources declare schedules, by the dotted config key whose value they
drive:
  routers  `Router.schedules(cfg_moe)` from their own keys (SMoE-Dropout's
           k ramp, the DTS gate's temperature);
  `schedules.<name>` config entries that drive an auxiliary-loss weight:
           {key: "moe.aux_loss_weight", shape, start, end, begin, stop}.
`all_schedules(cfg)` collects both; the trainer computes
`values(all_schedules(cfg), step)` inside its jitted step, passes them to
the model (`TransformerLM(schedule=...)`, read by routers through
`scheduled`) and to `aux_losses.total`, and logs each as
"schedule/<key>". Outside training (evaluation, decoding, tools) no values
are passed: a router then routes by its inference settings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import ConfigError, choice, fail, is_int

SHAPES = ("linear", "cosine", "exponential", "step")
SCHEDULE = "schedule"  # the key of the step's values in the dict shared by all MoE layers


@dataclasses.dataclass(frozen=True)
class Schedule:
  """`start` at step <= begin, `end` at step >= stop, in between by `shape`:

  linear       start + (end - start) p
  cosine       end + (start - end) (1 + cos(pi p)) / 2
  exponential  start (end / start)^p (start, end > 0: geometric, e.g. temperatures)
  step         start before `stop`, end from `stop` on
  with p = (step - begin) / (stop - begin) in [0, 1] (stop == begin: a step at begin).
  """

  start: float
  end: float
  begin: int
  stop: int
  shape: str = "linear"

  def check(self, prefix: str, **keys: str) -> None:
    """Raises ConfigError for bad fields, naming the config key `prefix + field` (or
    `keys[field]`) that holds each."""
    key = {f: keys.get(f, prefix + f) for f in ("start", "end", "begin", "stop", "shape")}
    choice(self.shape, key["shape"], SHAPES)
    for name in ("begin", "stop"):
      v = getattr(self, name)
      if not is_int(v) or v < 0:
        fail(key[name], v, "must be a non-negative integer (an optimizer step)")
    if self.stop < self.begin:
      fail(key["stop"], self.stop, f"must be >= {key['begin']}={self.begin}: the schedule "
           "would end before it starts")
    for name in ("start", "end"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        fail(key[name], v, "must be a finite number")
    if self.shape == "exponential" and not (self.start > 0 and self.end > 0):
      fail(key["shape"], self.shape, f"needs {key['start']} > 0 and {key['end']} > 0 (got "
           f"{self.start}, {self.end}); use 'linear' or 'cosine' for values that reach 0")

  def __call__(self, step: jax.Array | int) -> jax.Array:
    """float32 value at optimizer step `step` (0 before the first update)."""
    n = jnp.asarray(step, jnp.float32)
    width = max(self.stop - self.begin, 0)
    if width == 0:
      p = (n >= self.begin).astype(jnp.float32)
    else:
      p = jnp.clip((n - self.begin) / width, 0.0, 1.0)
    a, b = float(self.start), float(self.end)
    if self.shape == "linear":
      v = a + (b - a) * p
    elif self.shape == "cosine":
      v = b + (a - b) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    elif self.shape == "exponential":
      v = a * jnp.power(b / a, p)
    elif self.shape == "step":
      v = jnp.where(n >= self.stop, b, a)
    else:
      raise ValueError(f"schedule shape={self.shape!r}; allowed: {SHAPES}")
    return v.astype(jnp.float32)


def entry() -> ml_collections.ConfigDict:
  """The fields of one `schedules.<name>` config entry, at their defaults."""
  return ml_collections.ConfigDict(
      {"key": "", "shape": "linear", "start": 0.0, "end": 0.0, "begin": 0, "stop": 0})


def from_entry(e: Any) -> Schedule:
  return Schedule(start=e.start, end=e.end, begin=e.begin, stop=e.stop, shape=e.shape)


def loss_weight_keys(cfg: ml_collections.ConfigDict) -> list[str]:
  """The config keys a `schedules.<name>` entry may drive: the model's loss-weight keys."""
  from moejax.model.transformer import aux_losses  # noqa: PLC0415 (model imports this module)
  return sorted({s.weight for s in aux_losses(cfg).values() if s.weight is not None})


def all_schedules(cfg: ml_collections.ConfigDict) -> dict[str, Schedule]:
  """{driven config key: Schedule} of the chosen router and the `schedules` entries."""
  from moejax.moe.routers import get_router  # noqa: PLC0415
  out: dict[str, Schedule] = {}
  if cfg.moe.enabled:
    out.update(get_router(cfg.moe.router).schedules(cfg.moe))
  for name in sorted(cfg.get("schedules", {}).keys()):
    out[cfg.schedules[name].key] = from_entry(cfg.schedules[name])
  return out


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Every `schedules.<name>` entry: known fields, a loss-weight key, a valid window."""
  allowed = None
  owners: dict[str, str] = {}
  for name in sorted(cfg.get("schedules", {}).keys()):
    e, prefix = cfg.schedules[name], f"schedules.{name}"
    if not isinstance(e, ml_collections.ConfigDict):
      fail(prefix, e, f"must be a group of keys {sorted(entry().keys())}")
    unknown = sorted(set(e.keys()) - set(entry().keys()))
    missing = sorted(set(entry().keys()) - set(e.keys()))
    if unknown or missing:
      raise ConfigError(f"config group {prefix} has keys {sorted(e.keys())}; a schedule "
                        f"has exactly {sorted(entry().keys())}")
    allowed = loss_weight_keys(cfg) if allowed is None else allowed
    if e.key not in allowed:
      fail(f"{prefix}.key", e.key, f"allowed: the loss weights of this model {allowed}")
    if e.key in owners:
      fail(f"{prefix}.key", e.key, f"is already driven by schedules.{owners[e.key]}")
    owners[e.key] = name
    from_entry(e).check(prefix + ".")


def values(schedules: dict[str, Schedule], step: jax.Array | int) -> dict[str, jax.Array]:
  """{key: float32 value at `step`} of every schedule."""
  return {k: s(step) for k, s in schedules.items()}


def scheduled(shared: dict | None, key: str) -> jax.Array:
  """The step's value of schedule `key` from the dict shared by the MoE layers (a router
  reads its schedules so); raises when the model runs in training mode without them."""
  vals = (shared or {}).get(SCHEDULE)
  if vals is None or key not in vals:
    raise ValueError(f"the router's schedule {key!r} has no value: a model in training mode "
                     "(deterministic=False) needs schedule=moejax.schedules.values("
                     "all_schedules(cfg), step), as the trainer passes")
  return vals[key]
