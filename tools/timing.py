"""Interleaved wall-clock timing for the benchmark scripts in tools/."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def time_interleaved(fns: dict[str, tuple[Callable, tuple[Any, ...]]],
                     repeats: int, *, slow_s: float = 2.0) -> dict[str, float]:
  """Median seconds of each fn(*args) in `fns` ({name: (fn, args)}).

  After one compile+warmup call each, the functions run in turns (one call
  of each per round), so a drift of the machine's speed (other tenants,
  memory-bandwidth contention) hits a baseline and the candidates alike
  instead of biasing their ratio. Functions slower than `slow_s` stop after
  2 rounds.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  times: dict[str, list[float]] = {name: [] for name in fns}
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  for r in range(repeats):
    for name, (fn, args) in fns.items():
      if r >= 2 and min(times[name]) > slow_s:
        continue
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}
