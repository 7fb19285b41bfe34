"""Experts per token of adaptive routers (top_p, relu, null_experts, expert choice).

The number of selected experts vs the token's position in its sequence and
vs how frequent its token id is in the captured data (adaptive-computation
papers report that rare or hard tokens get more experts).
"""

from __future__ import annotations

import numpy as np

from moejax.analysis import plotting
from moejax.analysis.routing import Routing


def by_position(routing: Routing) -> np.ndarray:
  """[N, L] mean number of selected experts at each position (NaN: no token there)."""
  k_NxBxL = routing.experts_per_token().astype(np.float64)
  m_BxL = routing.mask_BxL
  cnt_L = m_BxL.sum(0)
  s_NxL = np.where(m_BxL[None], k_NxBxL, 0.0).sum(1)
  return np.where(cnt_L > 0, s_NxL / np.maximum(cnt_L, 1), np.nan)


def by_frequency(routing: Routing, num_bins: int = 8
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Experts per token vs token-id frequency, in log-spaced frequency bins.

  A token's frequency is the share of captured tokens with its id. Returns
  (edges [num_bins + 1], mean experts per token [N, num_bins] (NaN for
  empty bins), tokens per bin [num_bins]).
  """
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"num_bins={num_bins!r}; allowed: a positive integer")
  ids_T = routing.token_ids_BxL[routing.mask_BxL].astype(np.int64)
  k_NxT = routing.tokens(routing.experts_per_token()).astype(np.float64)
  if ids_T.size == 0:
    raise ValueError("routing has no unmasked token")
  freq_T = np.bincount(ids_T)[ids_T] / ids_T.size
  lo, hi = freq_T.min(), freq_T.max()
  edges = np.geomspace(lo, hi * (1 + 1e-9), num_bins + 1) if hi > lo else np.array([lo, hi * 2])
  bin_T = np.clip(np.searchsorted(edges, freq_T, side="right") - 1, 0, len(edges) - 2)
  nb = len(edges) - 1
  cnt = np.bincount(bin_T, minlength=nb)
  sums = np.stack([np.bincount(bin_T, weights=k, minlength=nb) for k in k_NxT])
  return edges, np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan), cnt


def plot_adaptive(pos_NxL: np.ndarray, edges: np.ndarray, freq_NxK: np.ndarray,
                  layers: list[int], path: str | None = None):
  """Experts per token vs position (left) and vs token frequency (right)."""
  fig = plotting.new_figure(10.0, 3.5)
  ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  centers = np.sqrt(edges[:-1] * edges[1:])
  for i, layer in enumerate(layers):
    ax1.plot(np.arange(pos_NxL.shape[1]), pos_NxL[i], label=f"layer {layer}")
    ax2.plot(centers, freq_NxK[i], marker="o", label=f"layer {layer}")
  ax1.set_xlabel("position in sequence")
  ax1.set_ylabel("experts per token")
  ax2.set_xscale("log")
  ax2.set_xlabel("token-id frequency in the captured data")
  ax2.set_ylabel("experts per token")
  ax2.legend(fontsize=8)
  return plotting.save(fig, path)
