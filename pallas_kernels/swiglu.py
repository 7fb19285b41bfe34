"""Grouped SwiGLU experts: the MoE expert layer on rows sorted by group.

  out[r] = scale[r] * (silu(x[r] Wg[j]) * (x[r] Wu[j])) Wd[j],
  j = group(r) - group_offset,

zero for rows outside the groups this call holds (rows past
sum(group_sizes) included); the group conventions are gmm's (`api.py`).
On the `cpu` backend it runs fused (`cpu_swiglu.py`: one chunk loop for
the whole forward, one for the whole backward); on every other backend it
is composed from `gmm` (and `tgmm` in its VJP), so the Pallas kernels do the
products on TPU and GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common, _validate, api, cpu_swiglu


def _composed(x, wg, wu, wd, scale, sizes, offset, cdt, tiling, backend):
  """Three gmm calls; autodiff goes through gmm's VJP."""
  f32 = jnp.float32
  def gmm(lhs, rhs):
    return api._gmm(lhs, rhs, sizes, offset, f32, False, tiling, backend)  # noqa: SLF001

  xc = x.astype(cdt)
  g = gmm(xc, wg.astype(cdt))
  u = gmm(xc, wu.astype(cdt))
  h = jax.nn.silu(g) * u
  # The down projection is linear: the scale goes on the narrower side (the
  # [m, f] hidden rows when f <= d, which also spares the backward an [m, d]
  # product and reduction), else on the [m, d] outputs.
  on_hidden = scale is not None and g.shape[-1] <= x.shape[-1]
  if on_hidden:
    h = h * scale[:, None]
  y = gmm(h.astype(cdt), wd.astype(cdt))
  if scale is not None and not on_hidden:
    y = y * scale[:, None]
  return y


# Static: cdt, has_scale, tiling.
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused(x, wg, wu, wd, scale, sizes, offset, cdt, has_scale, tiling):
  y, _, _ = cpu_swiglu.forward(x, wg, wu, wd, scale, sizes, offset, cdt=cdt,
                               has_scale=has_scale, residuals=False,
                               tiling=tiling)
  return y


def _fused_fwd(x, wg, wu, wd, scale, sizes, offset, cdt, has_scale, tiling):
  y, g, u = cpu_swiglu.forward(x, wg, wu, wd, scale, sizes, offset, cdt=cdt,
                               has_scale=has_scale, residuals=True,
                               tiling=tiling)
  return y, (x, wg, wu, wd, scale, sizes, offset, g, u)


def _fused_bwd(cdt, has_scale, tiling, res, dy):
  x, wg, wu, wd, scale, sizes, offset, g, u = res
  dx, dwg, dwu, dwd, ds = cpu_swiglu.backward(
      x, wg, wu, wd, scale, sizes, offset, g, u, dy, cdt=cdt,
      has_scale=has_scale, tiling=tiling)
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
  return (dx.astype(x.dtype), dwg.astype(wg.dtype), dwu.astype(wu.dtype),
          dwd.astype(wd.dtype), ds.astype(scale.dtype), zero(sizes),
          zero(offset))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check_weights(x, w_gate, w_up, w_down) -> None:
  _validate.check_array("x", x, 2, "[m, d]")
  _validate.check_float("x", x)
  for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
    _validate.check_array(name, w, 3, "[G, f, d]" if name == "w_down"
                          else "[G, d, f]")
    _validate.check_float(name, w)
  num, d, f = w_gate.shape
  want = {"w_gate": (num, d, f), "w_up": (num, d, f), "w_down": (num, f, d)}
  if d != x.shape[1]:
    raise ValueError(f"w_gate has shape {tuple(w_gate.shape)} [G, d, f] but x "
                     f"has d={x.shape[1]}; allowed: equal d")
  for name, w in (("w_up", w_up), ("w_down", w_down)):
    if tuple(w.shape) != want[name]:
      raise ValueError(f"{name} has shape {tuple(w.shape)}; with w_gate "
                       f"{tuple(w_gate.shape)} it must be {want[name]}")


def grouped_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, group_sizes: jax.Array, *,
                   scale: jax.Array | None = None, compute_dtype: Any = None,
                   group_offset: Any = None,
                   tiling: tuple[int, int, int] | None = None,
                   backend: str = "auto") -> jax.Array:
  """SwiGLU experts on rows sorted by group: [m, d] -> [m, d] float32.

  Args:
    x: [m, d] float32/bfloat16, rows sorted by group.
    w_gate, w_up: [G, d, f]; w_down: [G, f, d] (float32/bfloat16), groups
      group_offset .. group_offset + G - 1.
    group_sizes: [num_total_groups] int32 (gmm's conventions).
    scale: optional [m] per-row factor on the output (MoE combine weights);
      differentiable.
    compute_dtype: dtype of the products' operands (float32 accumulation);
      None: bfloat16 if x or a weight is, else float32.
    group_offset, tiling, backend: as for `gmm`.

  Returns:
    [m, d] float32. Differentiable in x, the weights and scale; gradients
    come back in each input's dtype.
  Raises:
    ValueError for bad ranks, shapes or dtypes and the argument errors of
    `gmm` (group sizes, offset, tiling, backend).
  """
  backend = api._resolve(backend)  # noqa: SLF001
  _check_weights(x, w_gate, w_up, w_down)
  m = x.shape[0]
  if scale is not None:
    _validate.check_array("scale", scale, 1, "[m]")
    _validate.check_float("scale", scale)
    if scale.shape[0] != m:
      raise ValueError(f"scale has shape {tuple(scale.shape)} but x has m={m} "
                       "rows; allowed: [m]")
  if compute_dtype is None:
    cdt = _common.compute_dtype(x.dtype, w_gate.dtype, w_up.dtype,
                                w_down.dtype)
  else:
    cdt = _validate.check_dtype("compute_dtype", compute_dtype)
  offset = _validate.check_group_block(group_sizes, m, w_gate.shape[0], group_offset,
                                      "the weights hold", "G")
  tiling = _validate.check_tiling(tiling)
  sizes = _common.normalize_group_sizes(jnp.asarray(group_sizes), m)
  if backend != "cpu":
    return _composed(x, w_gate, w_up, w_down, scale, sizes, offset, cdt,
                     tiling, backend)
  has_scale = scale is not None
  if not has_scale:
    scale = jnp.ones((m,), jnp.float32)
  return _fused(x, w_gate, w_up, w_down, scale, sizes, offset, cdt, has_scale,
                tiling)
