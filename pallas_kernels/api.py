"""Public gmm / tgmm: validation, backend dispatch and the custom VJP.

Group conventions (those of JAX's megablox kernels): rows of lhs are sorted by
group, group i owning rows [sum(gs[:i]), sum(gs[:i+1])). Rows past
sum(group_sizes) come out as zeros. `group_offset` says the rhs (gmm) or the
output (tgmm) holds groups [group_offset, group_offset + G_local) of a
possibly longer group_sizes vector; rows of other groups come out as zeros,
so summing gmm over expert shards reproduces the unsharded result.

Concrete group_sizes are checked (non-negative, sum <= m). Under jit the
values are unknown, and are clipped instead: negative sizes count as 0 and
groups are cut at row m (rows "beyond m" are ignored, later groups become
empty). Every backend sees the same clipped sizes, so results agree.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common, _validate, cpu, mosaic_tpu, triton, xla

# "interpret" runs the mosaic_tpu kernels with Pallas' interpreter (works on
# any platform); "interpret_triton" does the same for the triton kernels.
BACKENDS: tuple[str, ...] = ("mosaic_tpu", "triton", "interpret",
                             "interpret_triton", "xla", "cpu")
_PLATFORM_BACKEND = {"tpu": "mosaic_tpu", "gpu": "triton", "cuda": "triton",
                     "rocm": "triton", "cpu": "cpu"}


def default_backend() -> str:
  """Backend that backend="auto" picks on the default JAX platform."""
  return _PLATFORM_BACKEND.get(jax.default_backend(), "xla")


def _resolve(backend: str) -> str:
  if backend == "auto":
    return default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is unknown; allowed: 'auto', "
                     + ", ".join(repr(b) for b in BACKENDS))
  return backend


def _impl(backend: str, op: str):
  if backend == "interpret":
    return functools.partial(getattr(mosaic_tpu, op), interpret=True)
  if backend == "interpret_triton":
    return functools.partial(getattr(triton, op), interpret=True)
  module = {"mosaic_tpu": mosaic_tpu, "triton": triton, "xla": xla,
            "cpu": cpu}[backend]
  return getattr(module, op)


def _zero_cotangent(x: jax.Array):
  return np.zeros(x.shape, jax.dtypes.float0)


# ----------------------------------------------------------------------------
# gmm with custom VJP.  Static: out_dtype, transpose_rhs, tiling, backend.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm(lhs_MxK, rhs_GxKxN, group_sizes, group_offset, out_dtype,
         transpose_rhs, tiling, backend):
  return _impl(backend, "gmm")(lhs_MxK, rhs_GxKxN, group_sizes, group_offset,
                               out_dtype=out_dtype, transpose_rhs=transpose_rhs,
                               tiling=tiling)


def _gmm_fwd(lhs_MxK, rhs_GxKxN, group_sizes, group_offset, out_dtype,
             transpose_rhs, tiling, backend):
  out = _gmm(lhs_MxK, rhs_GxKxN, group_sizes, group_offset, out_dtype,
             transpose_rhs, tiling, backend)
  return out, (lhs_MxK, rhs_GxKxN, group_sizes, group_offset)


def _gmm_bwd(out_dtype, transpose_rhs, tiling, backend, res, dout_MxN):
  del out_dtype
  lhs_MxK, rhs_GxKxN, group_sizes, group_offset = res
  # d(lhs) = dout @ rhs_g^T for each row's group.
  dlhs = _gmm(dout_MxN, rhs_GxKxN, group_sizes, group_offset, lhs_MxK.dtype,
              not transpose_rhs, tiling, backend)
  # d(rhs_g) = lhs_g^T @ dout_g (or its transpose for a [G, n, k] rhs).
  x, y = (dout_MxN, lhs_MxK) if transpose_rhs else (lhs_MxK, dout_MxN)
  drhs = _impl(backend, "tgmm")(x, y, group_sizes, group_offset,
                                num_actual_groups=rhs_GxKxN.shape[0],
                                out_dtype=rhs_GxKxN.dtype, tiling=tiling)
  return dlhs, drhs, _zero_cotangent(group_sizes), _zero_cotangent(group_offset)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ----------------------------------------------------------------------------
# tgmm with custom VJP (so it is differentiable on the Pallas backends too).
# out[g] = x_g^T dy_g  =>  dx = gmm(dy, dout, transpose), ddy = gmm(x, dout).


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _tgmm(x_MxK, dy_MxN, group_sizes, group_offset, num_actual_groups,
          out_dtype, tiling, backend):
  return _impl(backend, "tgmm")(x_MxK, dy_MxN, group_sizes, group_offset,
                                num_actual_groups=num_actual_groups,
                                out_dtype=out_dtype, tiling=tiling)


def _tgmm_fwd(x_MxK, dy_MxN, group_sizes, group_offset, num_actual_groups,
              out_dtype, tiling, backend):
  out = _tgmm(x_MxK, dy_MxN, group_sizes, group_offset, num_actual_groups,
              out_dtype, tiling, backend)
  return out, (x_MxK, dy_MxN, group_sizes, group_offset)


def _tgmm_bwd(num_actual_groups, out_dtype, tiling, backend, res, dout_GxKxN):
  del num_actual_groups, out_dtype
  x_MxK, dy_MxN, group_sizes, group_offset = res
  dx = _gmm(dy_MxN, dout_GxKxN, group_sizes, group_offset, x_MxK.dtype, True,
            tiling, backend)
  ddy = _gmm(x_MxK, dout_GxKxN, group_sizes, group_offset, dy_MxN.dtype, False,
             tiling, backend)
  return dx, ddy, _zero_cotangent(group_sizes), _zero_cotangent(group_offset)


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


# ----------------------------------------------------------------------------
# Public API.


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type: Any = None, transpose_rhs: bool = False,
        group_offset: Any = None, tiling: tuple[int, int, int] | None = None,
        backend: str = "auto") -> jax.Array:
  """Grouped matmul: out[r] = lhs[r] @ rhs[group(r) - group_offset].

  Args:
    lhs: [m, k] float32/bfloat16, rows sorted by group.
    rhs: [G, k, n] (or [G, n, k] with transpose_rhs) float32/bfloat16; holds
      groups group_offset .. group_offset + G - 1. Mixed dtypes multiply in
      bfloat16.
    group_sizes: [num_total_groups] int32, num_total_groups >= G.
    preferred_element_type: output dtype; None means lhs.dtype. Products
      always accumulate in float32.
    transpose_rhs: rhs is [G, n, k].
    group_offset: int or int32 scalar (may be traced); default 0.
    tiling: (tm, tk, tn) for the Pallas kernels; cpu uses tm as its smallest
      row chunk; xla ignores it. None picks per shape.
    backend: "auto" or one of BACKENDS.

  Returns:
    [m, n]; rows outside the groups of this rhs (including rows past
    sum(group_sizes)) are zero. Differentiable in lhs and rhs.
  Raises:
    ValueError for bad ranks, shapes, dtypes, tiling, backend, a negative
    concrete group size or concrete group_sizes summing past m. Traced
    group_sizes are clipped to m rows instead (see module docstring).
  """
  backend = _resolve(backend)
  _validate.check_array("lhs", lhs, 2, "[m, k]")
  _validate.check_array("rhs", rhs, 3, "[G, n, k]" if transpose_rhs
                        else "[G, k, n]")
  _validate.check_float("lhs", lhs)
  _validate.check_float("rhs", rhs)
  m, k = lhs.shape
  rhs_k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if rhs_k != k:
    raise ValueError(
        f"rhs has shape {tuple(rhs.shape)}: its contracting dim "
        f"({'2' if transpose_rhs else '1'}, transpose_rhs={transpose_rhs}) is "
        f"{rhs_k} but lhs has k={k}; allowed: equal sizes")
  offset = _validate.check_group_block(group_sizes, m, rhs.shape[0], group_offset,
                                      "rhs holds", "rhs.shape[0]")
  out_dtype = _validate.out_dtype(preferred_element_type, lhs.dtype)
  tiling = _validate.check_tiling(tiling)
  sizes = _common.normalize_group_sizes(jnp.asarray(group_sizes), m)
  return _gmm(lhs, rhs, sizes, offset, out_dtype, bool(transpose_rhs), tiling,
              backend)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
         preferred_element_type: Any = None, group_offset: Any = None,
         num_actual_groups: int | None = None,
         tiling: tuple[int, int, int] | None = None,
         backend: str = "auto") -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs[:, rows of g] @ rhs[rows of g, :].

  Args:
    lhs: [k, m] float32/bfloat16 (columns sorted by group).
    rhs: [m, n] float32/bfloat16.
    group_sizes: [num_total_groups] int32.
    preferred_element_type: output dtype; None means lhs.dtype (float32
      accumulation always).
    group_offset: first group of the output (int or int32 scalar, may be
      traced); default 0.
    num_actual_groups: number of groups in the output; default
      len(group_sizes).
    tiling, backend: as for `gmm`.

  Returns:
    [num_actual_groups, k, n] holding groups group_offset ..
    group_offset + num_actual_groups - 1; empty groups are zero.
  """
  backend = _resolve(backend)
  _validate.check_array("lhs", lhs, 2, "[k, m]")
  _validate.check_array("rhs", rhs, 2, "[m, n]")
  _validate.check_float("lhs", lhs)
  _validate.check_float("rhs", rhs)
  k, m = lhs.shape
  if rhs.shape[0] != m:
    raise ValueError(f"rhs has shape {tuple(rhs.shape)} but lhs [k, m] has "
                     f"m={m}; allowed: rhs.shape[0] == lhs.shape[1]")
  _validate.check_group_sizes(group_sizes, m)
  num_total = group_sizes.shape[0]
  if num_actual_groups is None:
    num_actual_groups = num_total
  if (not isinstance(num_actual_groups, (int, np.integer))
      or not 1 <= num_actual_groups <= num_total):
    raise ValueError(f"num_actual_groups={num_actual_groups!r} must be an int "
                     f"in [1, {num_total}] (len(group_sizes))")
  offset = _validate.check_group_offset(group_offset, num_total,
                                        int(num_actual_groups))
  out_dtype = _validate.out_dtype(preferred_element_type, lhs.dtype)
  tiling = _validate.check_tiling(tiling)
  sizes = _common.normalize_group_sizes(jnp.asarray(group_sizes), m)
  return _tgmm(lhs.T, rhs, sizes, offset, int(num_actual_groups), out_dtype,
               tiling, backend)
