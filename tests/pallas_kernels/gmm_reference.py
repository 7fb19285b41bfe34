"""Independent slow references: NumPy float64 loops over groups."""

from __future__ import annotations

import numpy as np


def _bounds(group_sizes) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(np.asarray(group_sizes, np.int64))])


def gmm(lhs_MxK, rhs_GxKxN, group_sizes, group_offset: int = 0,
        transpose_rhs: bool = False) -> np.ndarray:
  lhs = np.asarray(lhs_MxK, np.float64)
  rhs = np.asarray(rhs_GxKxN, np.float64)
  if transpose_rhs:
    rhs = rhs.transpose(0, 2, 1)
  bounds = _bounds(group_sizes)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  for j in range(rhs.shape[0]):
    lo, hi = bounds[group_offset + j], bounds[group_offset + j + 1]
    out[lo:hi] = lhs[lo:hi] @ rhs[j]
  return out


def tgmm(lhs_KxM, rhs_MxN, group_sizes, group_offset: int = 0,
         num_actual_groups: int | None = None) -> np.ndarray:
  lhs = np.asarray(lhs_KxM, np.float64)
  rhs = np.asarray(rhs_MxN, np.float64)
  bounds = _bounds(group_sizes)
  num = len(group_sizes) if num_actual_groups is None else num_actual_groups
  out = np.zeros((num, lhs.shape[0], rhs.shape[1]))
  for j in range(num):
    lo, hi = bounds[group_offset + j], bounds[group_offset + j + 1]
    out[j] = lhs[:, lo:hi] @ rhs[lo:hi]
  return out


def gmm_grads(lhs_MxK, rhs_GxKxN, group_sizes, dout_MxN, group_offset: int = 0,
              transpose_rhs: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(d lhs, d rhs) of sum(gmm(lhs, rhs) * dout), by explicit loops."""
  lhs = np.asarray(lhs_MxK, np.float64)
  rhs = np.asarray(rhs_GxKxN, np.float64)
  dout = np.asarray(dout_MxN, np.float64)
  bounds = _bounds(group_sizes)
  dlhs = np.zeros_like(lhs)
  drhs = np.zeros_like(rhs)
  for j in range(rhs.shape[0]):
    lo, hi = bounds[group_offset + j], bounds[group_offset + j + 1]
    w_KxN = rhs[j].T if transpose_rhs else rhs[j]
    dlhs[lo:hi] = dout[lo:hi] @ w_KxN.T
    dw_KxN = lhs[lo:hi].T @ dout[lo:hi]
    drhs[j] = dw_KxN.T if transpose_rhs else dw_KxN
  return dlhs, drhs


def _silu_parts(g):
  sig = 1.0 / (1.0 + np.exp(-g))
  return g * sig, sig * (1.0 + g * (1.0 - sig))  # silu(g), silu'(g)


def grouped_swiglu(x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD, group_sizes, scale_M=None,
                   group_offset: int = 0) -> np.ndarray:
  """out[r] = s[r] (silu(x[r] Wg) * (x[r] Wu)) Wd for row r of local group j."""
  y, _ = grouped_swiglu_grads(x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD, group_sizes,
                              None, scale_M, group_offset)
  return y


def grouped_swiglu_grads(x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD, group_sizes, dy_MxD,
                         scale_M=None, group_offset: int = 0):
  """(y, grads) with grads = (dx, dWg, dWu, dWd, ds) of sum(y * dy) (None without dy)."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD))
  m = x.shape[0]
  s = np.ones(m) if scale_M is None else np.asarray(scale_M, np.float64)
  bounds = _bounds(group_sizes)
  y = np.zeros_like(x)
  dx, dwg, dwu, dwd, ds = (np.zeros_like(a) for a in (x, wg, wu, wd, s))
  for j in range(wg.shape[0]):
    lo, hi = bounds[group_offset + j], bounds[group_offset + j + 1]
    xs, sj = x[lo:hi], s[lo:hi, None]
    g, u = xs @ wg[j], xs @ wu[j]
    act, dact = _silu_parts(g)
    y[lo:hi] = (act * u * sj) @ wd[j]
    if dy_MxD is None:
      continue
    dys = np.asarray(dy_MxD, np.float64)[lo:hi]
    dwd[j] = (act * u * sj).T @ dys
    dh = dys @ wd[j].T
    ds[lo:hi] = np.sum(dh * act * u, axis=1)
    du, dg = dh * sj * act, dh * sj * u * dact
    dwg[j], dwu[j] = xs.T @ dg, xs.T @ du
    dx[lo:hi] = dg @ wg[j].T + du @ wu[j].T
  return y, (None if dy_MxD is None else (dx, dwg, dwu, dwd, ds))
