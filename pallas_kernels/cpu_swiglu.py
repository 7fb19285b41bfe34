"""Fused grouped SwiGLU for the `cpu` backend: one chunk loop per pass.

Why fuse: composed from gmm/tgmm, a SwiGLU expert layer is three gmm calls
forward and three gmm plus three tgmm calls backward, and every call
zero-fills its [m, n] output and copies each chunk's product into it
(XLA:CPU writes no dot into a slice of a loop-carried buffer); the [m, f]
intermediates (hidden rows, their cotangent, the gate and up cotangents)
each make a round trip through memory between calls. Here one loop over
the same row chunks as `cpu.gmm` (see `pallas_kernels/cpu.py`) does all of
a chunk's work while its rows are in cache:

  forward:  g = x Wg, u = x Wu, h = silu(g) u s, y = h Wd   (writes g, u, y)
  backward: dWd += h^T dy, dh = dy Wd^T, ds = <dh, silu(g) u>,
            dg, du from dh s, dWg += x^T dg, dWu += x^T du,
            dx = dg Wg^T + du Wu^T                          (writes dx, ds, dW)

The forward keeps g and u (float32) for the backward, which recomputes h.
Products take operands in the compute dtype and accumulate in float32; the
elementwise math is float32; the weight gradients accumulate in float32.

Rows of a head chunk that are not the group's (see `cpu._for_each_chunk`)
are masked: on write for the row outputs, and to zero on read for the
weight-gradient products (a row outside may hold inf or nan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, cpu

_T = (((0,), (0,)), ((), ()))  # x^T y: contract the rows
_NT = (((1,), (1,)), ((), ()))  # x W^T: contract the last dims


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _each_chunk(chunk, start, end, classes: list[int], m_rows: int, carry):
  """`cpu._for_each_chunk` with one body: chunk(c_rows, row0, carry, keep),
  keep = the head chunk's row mask, None for the full top chunks."""
  return cpu._for_each_chunk(
      start, end, classes, m_rows,
      lambda c_rows, row0, keep, c: chunk(c_rows, row0, c, keep),
      lambda row0, c: chunk(classes[-1], row0, c, None), carry)


def _rows(m: int, tiling) -> tuple[list[int], int]:
  classes = cpu._chunk_classes(m, tiling)
  return classes, max(m, classes[0])


def forward(x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD, scale_M, group_sizes,
            group_offset, *, cdt, has_scale: bool, residuals: bool, tiling):
  """(y [m, d], g [m, f], u [m, f]) float32; g and u only with residuals."""
  m, d = x_MxD.shape
  num_local, _, f = wg_GxDxF.shape
  classes, m_rows = _rows(m, tiling)
  x, wg, wu, wd = cpu._opaque(
      _common.pad_axis(x_MxD.astype(cdt), 0, m_rows),
      wg_GxDxF.astype(cdt), wu_GxDxF.astype(cdt), wd_GxFxD.astype(cdt))
  s = _common.pad_axis(scale_M.astype(jnp.float32), 0, m_rows)
  starts, ends = _common.local_bounds(group_sizes, group_offset, num_local)

  def group_body(j, start, end, carry):
    wgj, wuj, wdj = (cpu._group_weights(w, j) for w in (wg, wu, wd))

    def chunk(c_rows, row0, carry, keep):
      xc = lax.dynamic_slice_in_dim(x, row0, c_rows, 0)
      g, u = _dot(xc, wgj), _dot(xc, wuj)
      h = jax.nn.silu(g) * u
      if has_scale:
        h = h * lax.dynamic_slice_in_dim(s, row0, c_rows, 0)[:, None]
      y = _dot(h.astype(cdt), wdj)
      outs = (y, g, u) if residuals else (y,)
      return tuple(cpu._write_rows(b, o, row0, keep) for b, o in zip(carry, outs))

    return _each_chunk(chunk, start, end, classes, m_rows, carry)

  bufs = [cpu._fresh_zeros((m_rows, d), x, wd)]
  if residuals:
    bufs += [cpu._fresh_zeros((m_rows, f), x, wg),
             cpu._fresh_zeros((m_rows, f), x, wu)]
  out = cpu._for_each_nonempty_group(starts, ends, group_body, tuple(bufs))
  y = out[0][:m]
  return (y, out[1][:m], out[2][:m]) if residuals else (y, None, None)


def backward(x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD, scale_M, group_sizes,
             group_offset, g_MxF, u_MxF, dy_MxD, *, cdt, has_scale: bool,
             tiling):
  """(dx [m, d], dWg, dWu, dWd, ds [m]), all float32; ds is zero without scale."""
  m, d = x_MxD.shape
  num_local, _, f = wg_GxDxF.shape
  classes, m_rows = _rows(m, tiling)
  pad = lambda a: _common.pad_axis(a, 0, m_rows)  # noqa: E731
  x, wg, wu, wd, dy = cpu._opaque(
      pad(x_MxD.astype(cdt)), wg_GxDxF.astype(cdt), wu_GxDxF.astype(cdt),
      wd_GxFxD.astype(cdt), pad(dy_MxD.astype(cdt)))
  g_all, u_all = pad(g_MxF), pad(u_MxF)
  s = pad(scale_M.astype(jnp.float32))
  starts, ends = _common.local_bounds(group_sizes, group_offset, num_local)

  def group_body(j, start, end, carry):
    wgj, wuj, wdj = (cpu._group_weights(w, j) for w in (wg, wu, wd))

    def chunk(c_rows, row0, carry, keep):
      dx_buf, ds_buf, dwg_buf, dwu_buf, dwd_buf = carry
      rows = [lax.dynamic_slice_in_dim(a, row0, c_rows, 0)
              for a in (x, g_all, u_all, dy, s)]
      if keep is not None:  # rows outside the group: zero (may be inf/nan)
        rows = [jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0)
                for a in rows]
      xc, g, u, dyc, sc = rows
      sig = jax.nn.sigmoid(g)
      act = g * sig  # silu(g)
      hu = act * u
      h = hu * sc[:, None] if has_scale else hu
      dwd = _dot(h.astype(cdt), dyc, _T)
      dh = _dot(dyc, wdj, _NT)
      if has_scale:
        ds = jnp.sum(dh * hu, axis=-1)
        dh = dh * sc[:, None]
      du = (dh * act).astype(cdt)
      dg = (dh * u * (sig * (1 + g * (1 - sig)))).astype(cdt)
      dx = _dot(dg, wgj, _NT) + _dot(du, wuj, _NT)
      first = keep is not None  # the head chunk comes first in its group
      return (cpu._write_rows(dx_buf, dx, row0, keep),
              cpu._write_rows(ds_buf, ds, row0, keep) if has_scale else ds_buf,
              cpu._write_group(dwg_buf, j, _dot(xc, dg, _T), first),
              cpu._write_group(dwu_buf, j, _dot(xc, du, _T), first),
              cpu._write_group(dwd_buf, j, dwd, first))

    return _each_chunk(chunk, start, end, classes, m_rows, carry)

  zeros = cpu._fresh_zeros
  init = (zeros((m_rows, d), x, dy), zeros((m_rows,), s, dy),
          zeros((num_local, d, f), x, dy), zeros((num_local, d, f), x, g_all),
          zeros((num_local, f, d), u_all, dy))
  dx, ds, dwg, dwu, dwd = cpu._for_each_nonempty_group(starts, ends,
                                                      group_body, init)
  return dx[:m], dwg, dwu, dwd, ds[:m]
