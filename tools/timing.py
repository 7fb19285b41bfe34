"""Interleaved wall-clock timing for the benchmark scripts in tools/."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def time_interleaved(fns: dict[str, tuple[Callable, tuple[Any, ...]]],
                     repeats: int, *, slow_s: float = 2.0,
                     warmup: int = 1) -> dict[str, float]:
  """Median seconds of each fn(*args) in `fns` ({name: (fn, args)}).

  After `warmup` untimed rounds (the first compiles), the functions run in
  turns (one call of each per round), so a drift of the machine's speed
  (other tenants, memory-bandwidth contention) hits a baseline and the
  candidates alike instead of biasing their ratio. Functions slower than
  `slow_s` stop after 2 timed rounds, and after 2 warmup calls. Why more
  than one warmup round: on the dev box a fresh process runs its first ~5
  calls of a program up to 2x slower (its memory is being faulted in),
  which moved a 9-round median by up to 30%.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  if warmup < 1:
    raise ValueError(f"warmup={warmup} must be >= 1 (the first call compiles)")
  times: dict[str, list[float]] = {name: [] for name in fns}
  slow: set[str] = set()
  for w in range(warmup):
    for name, (fn, args) in fns.items():
      if name in slow:
        continue
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      if w > 0 and time.perf_counter() - t > slow_s:  # round 0 compiles
        slow.add(name)
  for r in range(repeats):
    for name, (fn, args) in fns.items():
      if r >= 2 and min(times[name]) > slow_s:
        continue
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}
