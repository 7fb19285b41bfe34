"""Multi-host start-up: `jax.distributed.initialize` from arguments or environment.

Every process of a multi-host run calls `initialize(...)` before anything
touches a JAX backend. Values come from the arguments, else from
MOEJAX_COORDINATOR / MOEJAX_NUM_PROCESSES / MOEJAX_PROCESS_ID, else from
JAX's JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. With
nothing set, or one process, it does nothing. A coordinator of "auto" lets
JAX detect the cluster (Cloud TPU VMs, SLURM, ...) itself. On CPU the
cross-process collectives use gloo.
"""

from __future__ import annotations

import os

ENV = {"coordinator_address": ("MOEJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
       "num_processes": ("MOEJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
       "process_id": ("MOEJAX_PROCESS_ID", "JAX_PROCESS_ID")}
FLAGS = {"coordinator_address": "--coordinator", "num_processes": "--num_processes",
         "process_id": "--process_id"}


def _from_env(name: str) -> str | None:
  for var in ENV[name]:
    v = os.environ.get(var)
    if v not in (None, ""):
      return v
  return None


def _as_int(name: str, value) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{FLAGS[name]}={value!r} (or ${ENV[name][0]}) is invalid: "
                     "must be an integer") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> dict | None:
  """The arguments for jax.distributed.initialize, or None for a single process.

  Raises ValueError naming the flag for incomplete or inconsistent values.
  """
  coord = coordinator_address or _from_env("coordinator_address")
  n = _as_int("num_processes", num_processes if num_processes is not None
              else _from_env("num_processes"))
  pid = _as_int("process_id", process_id if process_id is not None else _from_env("process_id"))
  if coord == "auto":  # JAX detects the cluster; explicit values still win
    return {k: v for k, v in (("num_processes", n), ("process_id", pid)) if v is not None}
  if coord is None and n is None and pid is None:
    return None
  if n is not None and n < 1:
    raise ValueError(f"--num_processes={n} is invalid: must be >= 1")
  if n == 1 and coord is None:
    return None
  missing = [FLAGS[k] for k, v in (("coordinator_address", coord), ("num_processes", n),
                                   ("process_id", pid)) if v is None]
  if missing:
    raise ValueError(f"a multi-host run needs --coordinator, --num_processes and "
                     f"--process_id (or $MOEJAX_COORDINATOR, ...); missing: {missing}")
  if not 0 <= pid < n:
    raise ValueError(f"--process_id={pid} is invalid: must be in [0, --num_processes={n})")
  if n == 1:
    return None
  return {"coordinator_address": coord, "num_processes": n, "process_id": pid}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed for a multi-host run; returns whether it did.

  A no-op (False) for a single process or when already initialised.
  """
  args = resolve(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  import jax  # noqa: PLC0415 (keep `resolve` importable without starting JAX)
  if jax.distributed.is_initialized():
    return False
  # CPU hosts (tests, CPU clusters) need cross-process collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  return True


__all__ = ["initialize", "resolve"]
