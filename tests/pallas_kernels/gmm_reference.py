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
