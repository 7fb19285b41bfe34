"""Config-check helpers shared by every component's `check_config` (imports nothing of moejax).

Each component validates its own keys next to its code (the router its
options, the data pipeline `data.*`, the mesh `parallel.*`, ...);
`moejax.validation.validate` runs them all. A bad value raises `ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A config key holds a value moejax cannot run with."""


def fail(key: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config key {key}={value!r} is invalid: {allowed}")


def lookup(cfg: Any, key: str) -> Any:
  """The value at dotted `key` of a (nested) ConfigDict."""
  v = cfg
  for part in key.split("."):
    v = v[part]
  return v


def is_int(v: Any) -> bool:
  """An int that is not a bool (True would pass isinstance(v, int))."""
  return isinstance(v, int) and not isinstance(v, bool)


def positive(cfg: Any, key: str, allow_zero: bool = False) -> None:
  """The number at dotted `key` is > 0 (>= 0 with allow_zero)."""
  v = lookup(cfg, key)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
    fail(key, v, "must be a " + ("non-negative" if allow_zero else "positive") + " number")


def positive_int(cfg: Any, key: str, allow_zero: bool = False) -> None:
  v = lookup(cfg, key)
  if not is_int(v) or v < 0 or (v == 0 and not allow_zero):
    fail(key, v, "must be a " + ("non-negative" if allow_zero else "positive") + " integer")


def choice(value: Any, key: str, allowed) -> None:
  if value not in allowed:
    fail(key, value, f"allowed: {sorted(allowed)}")


def refuse_constant_gate(k_key: str, k: int, gate_key: str, gate: Any, num_experts: int,
                         fix: str | None = None) -> None:
  """Top-1 of several experts with a normalised gate: refused.

  A single normalised weight is always 1, so the router would get no gradient
  from the LM loss and learn only from its balancing losses (Switch keeps the
  chosen expert's softmax probability as the gate instead). `gate` is the
  normalising setting's value (True/'topk_softmax'); falsy = not normalised.
  """
  if k == 1 and gate and num_experts > 1:
    fix = fix or f"use {k_key} >= 2 or {gate_key}=False (the softmax probability as gate)"
    fail(gate_key, gate, f"with {k_key}=1 of {num_experts} experts the gate would be "
         f"constantly 1 and the router would learn only from the balancing losses; {fix}")


def reraise(fn, *args) -> None:
  """fn(*args), with a ValueError from a pure helper turned into ConfigError."""
  try:
    fn(*args)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None
