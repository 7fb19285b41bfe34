"""Router saturation: how much the routing of the same tokens changes between checkpoints.

Saturation of checkpoint a against checkpoint b, per layer, is the mean over
tokens of |S_a ∩ S_b| / max(|S_a|, |S_b|), S = the token's selected experts
(1 when both are empty). For top-k routers this is the top-k overlap
|S_a ∩ S_b| / k; for adaptive routers it also penalises a change in the
number of experts. Identical routings give 1; a curve of saturation against
the final checkpoint over training steps shows when routing stops changing.
"""

from __future__ import annotations

import numpy as np

from moejax.analysis import plotting
from moejax.analysis.routing import Routing


def overlap(sel_a_NxTxE: np.ndarray, sel_b_NxTxE: np.ndarray) -> np.ndarray:
  """[N, T] per-token overlap |A ∩ B| / max(|A|, |B|) (1 when both are empty)."""
  a, b = np.asarray(sel_a_NxTxE, bool), np.asarray(sel_b_NxTxE, bool)
  inter = np.sum(a & b, axis=-1)
  size = np.maximum(a.sum(-1), b.sum(-1))
  return np.where(size > 0, inter / np.maximum(size, 1), 1.0)


def saturation(a: Routing, b: Routing) -> np.ndarray:
  """[N] mean per-token overlap of two routings of the same tokens and layers."""
  if a.layers != b.layers:
    raise ValueError(f"routings cover different layers: {a.layers} vs {b.layers}; "
                     "allowed: captures of the same layers")
  if a.token_ids_BxL.shape != b.token_ids_BxL.shape or not np.array_equal(
      a.token_ids_BxL, b.token_ids_BxL) or not np.array_equal(a.mask_BxL, b.mask_BxL):
    raise ValueError("routings are of different tokens; allowed: two captures of the same data")
  if a.num_experts != b.num_experts:
    raise ValueError(f"num_experts differ ({a.num_experts} vs {b.num_experts})")
  if not a.mask_BxL.any():
    raise ValueError("routings have no unmasked token; allowed: captures with tokens")
  return overlap(a.tokens(a.selected_NxBxLxE), b.tokens(b.selected_NxBxLxE)).mean(axis=-1)


def saturation_curve(routings: dict[int, Routing], reference: Routing
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(steps [S], saturation [S, N]) of each step's routing against `reference`."""
  steps = np.asarray(sorted(routings), np.int64)
  return steps, np.stack([saturation(routings[int(s)], reference) for s in steps])


def plot_saturation(steps_S: np.ndarray, sat_SxN: np.ndarray, layers: list[int],
                    reference_step: int | None, path: str | None = None):
  """Saturation against the reference checkpoint vs training step, one line per layer."""
  fig = plotting.new_figure(5.5, 3.5)
  ax = fig.add_subplot()
  for i, layer in enumerate(layers):
    ax.plot(steps_S, sat_SxN[:, i], marker="o", label=f"layer {layer}")
  ax.set_xlabel("checkpoint step")
  ax.set_ylabel("overlap of selected experts")
  ax.set_ylim(0.0, 1.05)
  ax.set_title(f"router saturation vs step {reference_step}")
  ax.legend(fontsize=8)
  return plotting.save(fig, path)
