"""Argument checks for gmm / tgmm: fail early, naming argument, value, and what is allowed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _dtype_names() -> str:
  return ", ".join(str(d) for d in SUPPORTED_DTYPES)


def check_array(name: str, x: Any, ndim: int, shape_doc: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array of rank {ndim} {shape_doc}, "
                     f"got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim} {shape_doc}, got shape "
                     f"{tuple(x.shape)} (rank {x.ndim})")
  if any(d == 0 for d in x.shape):
    raise ValueError(f"{name} must have no zero-sized dimension, got shape "
                     f"{tuple(x.shape)}")


def check_float(name: str, x: jax.Array) -> None:
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"{name} has dtype {x.dtype}; supported dtypes are "
                     f"{_dtype_names()}")


def check_dtype(name: str, value: Any) -> jnp.dtype:
  """`value` as a supported dtype; ValueError naming `name` otherwise."""
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name}={value!r} is not a dtype; allowed: None, "
                     f"{_dtype_names()}") from e
  if dt not in SUPPORTED_DTYPES:
    raise ValueError(f"{name}={dt} is not supported; allowed: None, "
                     f"{_dtype_names()}")
  return dt


def out_dtype(preferred_element_type: Any, lhs_dtype) -> jnp.dtype:
  if preferred_element_type is None:
    return jnp.dtype(lhs_dtype)
  return check_dtype("preferred_element_type", preferred_element_type)


def check_group_sizes(group_sizes: Any, m: int) -> None:
  """Rank/dtype always; non-negativity and sum <= m when the values are concrete."""
  check_array("group_sizes", group_sizes, 1, "[num_groups]")
  if jnp.dtype(group_sizes.dtype) != jnp.int32:
    raise ValueError(f"group_sizes has dtype {group_sizes.dtype}; it must be "
                     "int32")
  if isinstance(group_sizes, jax.core.Tracer):
    return  # Traced: documented clipping behaviour applies.
  sizes = np.asarray(group_sizes)
  if (sizes < 0).any():
    raise ValueError(f"group_sizes must be non-negative, got {sizes.tolist()}")
  total = int(sizes.sum())
  if total > m:
    raise ValueError(f"group_sizes sums to {total}, more than the {m} rows of "
                     "lhs; allowed: sum(group_sizes) <= m")


def check_group_offset(group_offset: Any, num_total: int,
                       num_local: int) -> jax.Array:
  """Returns group_offset as an int32 scalar array (0 when None)."""
  if group_offset is None:
    return jnp.zeros((), jnp.int32)
  if isinstance(group_offset, (int, np.integer)):
    group_offset = np.int32(group_offset)
  if not hasattr(group_offset, "shape") or group_offset.shape not in ((), (1,)):
    raise ValueError("group_offset must be an int or an int32 scalar array, "
                     f"got {group_offset!r}")
  if not jnp.issubdtype(group_offset.dtype, jnp.integer):
    raise ValueError(f"group_offset has dtype {group_offset.dtype}; it must be "
                     "an integer (int32)")
  if not isinstance(group_offset, jax.core.Tracer):
    off = int(np.asarray(group_offset).reshape(()))
    if off < 0 or off + num_local > num_total:
      raise ValueError(
          f"group_offset={off} with {num_local} local groups needs groups "
          f"[{off}, {off + num_local}) but group_sizes has {num_total}; allowed:"
          f" 0 <= group_offset <= {num_total - num_local}")
  return jnp.asarray(group_offset, jnp.int32).reshape(())


def check_group_block(group_sizes: Any, m: int, num_local: int, group_offset: Any,
                      holder: str, allowed: str) -> jax.Array:
  """Group sizes for m rows, a block of num_local groups that fits in them,
  and its offset (returned as an int32 scalar). `holder` names what holds
  the block in the error ("rhs holds"), `allowed` its count ("rhs.shape[0]")."""
  check_group_sizes(group_sizes, m)
  num_total = group_sizes.shape[0]
  if num_local > num_total:
    raise ValueError(f"{holder} {num_local} groups but group_sizes has only "
                     f"{num_total}; allowed: {allowed} <= len(group_sizes)")
  return check_group_offset(group_offset, num_total, num_local)


def check_tiling(tiling: Any) -> tuple[int, int, int] | None:
  if tiling is None:
    return None
  ok = (isinstance(tiling, (tuple, list)) and len(tiling) == 3 and
        all(isinstance(t, (int, np.integer)) and t >= 1 for t in tiling))
  if not ok:
    raise ValueError(f"tiling={tiling!r} must be None or a tuple of three "
                     "positive ints (tm, tk, tn)")
  return tuple(int(t) for t in tiling)
