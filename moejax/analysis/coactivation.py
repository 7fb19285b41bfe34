"""Co-activation of experts: how often experts i and j are selected by the same token."""

from __future__ import annotations

import numpy as np

from moejax.analysis import plotting
from moejax.analysis.routing import Routing


def coactivation(routing: Routing) -> np.ndarray:
  """[N, E, E]: share of tokens selecting both i and j (diagonal: selecting i).

  Symmetric; float64. A layer whose tokens never select two experts has a
  zero off-diagonal.
  """
  sel_NxTxE = routing.tokens(routing.selected_NxBxLxE).astype(np.float64)
  t = max(sel_NxTxE.shape[1], 1)
  return np.einsum("nti,ntj->nij", sel_NxTxE, sel_NxTxE) / t


def conditional(coact_NxExE: np.ndarray) -> np.ndarray:
  """[N, E, E] P(j selected | i selected) = C[i, j] / C[i, i] (0 for unused i)."""
  diag_NxE = np.diagonal(coact_NxExE, axis1=1, axis2=2)
  return np.where(diag_NxE[..., None] > 0,
                  coact_NxExE / np.maximum(diag_NxE[..., None], 1e-300), 0.0)


def density(coact_NxExE: np.ndarray, min_share: float = 0.0) -> np.ndarray:
  """[N] share of expert pairs i < j co-selected by more than `min_share` of tokens."""
  e = coact_NxExE.shape[-1]
  if e < 2:
    return np.zeros(coact_NxExE.shape[0])
  iu = np.triu_indices(e, k=1)
  return np.mean(coact_NxExE[:, iu[0], iu[1]] > min_share, axis=-1)


def plot_coactivation(coact_NxExE: np.ndarray, layers: list[int], path: str | None = None):
  """One heatmap per layer of P(column expert | row expert)."""
  cond = conditional(coact_NxExE)
  n, e = cond.shape[0], cond.shape[-1]
  cols = min(n, 4)
  rows = -(-n // cols)
  fig = plotting.new_figure(1.5 + (1.0 + 0.3 * e) * cols, (0.8 + 0.3 * e) * rows)
  for i in range(n):
    ax = fig.add_subplot(rows, cols, i + 1)
    plotting.heatmap(ax, cond[i], xlabel="expert j", ylabel="expert i",
                     title=f"layer {layers[i]}: P(j | i)", vmin=0.0, vmax=1.0)
  return plotting.save(fig, path)
