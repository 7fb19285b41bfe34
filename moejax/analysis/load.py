"""Expert load per layer and its imbalance (CV, max/mean); layer x expert heatmap."""

from __future__ import annotations

import numpy as np

from moejax.analysis import plotting
from moejax.analysis.routing import Routing

BY = ("selected", "weight")


def expert_load(routing: Routing, by: str = "selected") -> np.ndarray:
  """[N, E] share of each layer's expert assignments going to each expert.

  by="selected" counts (token, expert) selections, as the layer's `load`
  metric counts valid slots; by="weight" sums combine weights instead (for
  Soft MoE, the combine mass). Rows sum to 1 (0 for a layer with none).
  """
  if by == "selected":
    x_NxTxE = routing.tokens(routing.selected_NxBxLxE).astype(np.float64)
  elif by == "weight":
    x_NxTxE = routing.tokens(routing.weights_NxBxLxE).astype(np.float64)
  else:
    raise ValueError(f"by={by!r}; allowed: {BY}")
  counts_NxE = x_NxTxE.sum(axis=1)
  total_Nx1 = counts_NxE.sum(axis=1, keepdims=True)
  return np.where(total_Nx1 > 0, counts_NxE / np.maximum(total_Nx1, 1e-300), 0.0)


def imbalance(load_NxE: np.ndarray) -> dict[str, np.ndarray]:
  """Per layer: "cv" = std/mean of the load and "max_over_mean" (1 = balanced).

  The same definitions as the training metrics (moejax.moe.metrics), in float64.
  """
  load_NxE = np.asarray(load_NxE, np.float64)
  mean_N = np.maximum(load_NxE.mean(axis=-1), 1e-12)
  return {"cv": load_NxE.std(axis=-1) / mean_N, "max_over_mean": load_NxE.max(axis=-1) / mean_N}


def plot_load(load_NxE: np.ndarray, layers: list[int], path: str | None = None):
  """Layer x expert heatmap of the load, as a multiple of the balanced share 1/E."""
  load_NxE = np.asarray(load_NxE)
  e = load_NxE.shape[-1]
  fig = plotting.new_figure(1.5 + 0.35 * e, 1.5 + 0.4 * len(layers))
  plotting.heatmap(fig.add_subplot(), load_NxE * e, xlabel="expert", ylabel="layer",
                   title="expert load / balanced share", yticks=[str(x) for x in layers],
                   xticks=[str(j) for j in range(e)], cmap="magma")
  return plotting.save(fig, path)
