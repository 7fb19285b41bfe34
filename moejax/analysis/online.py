"""Cheap routing metrics logged at each evaluation of a training run.

On one fixed validation batch: per MoE layer, the load CV, the co-activation
density (share of expert pairs some token selects together) and the
saturation against the previous evaluation (overlap of each token's selected
experts, see `saturation`). The trainer keeps the previous routing and calls
`eval_metrics` after each eval.
"""

from __future__ import annotations

import numpy as np

from moejax.analysis import coactivation, load, saturation
from moejax.analysis.routing import Model, Routing, capture, layer_groups


def routing_metrics(routing: Routing, previous: Routing | None = None) -> dict[str, float]:
  """{"routing/layer{i}/load_cv", ".../coactivation_density", ".../saturation_prev"}.

  saturation_prev is present only when `previous` (the same tokens) is given.
  """
  cv_N = load.imbalance(load.expert_load(routing))["cv"]
  dens_N = coactivation.density(coactivation.coactivation(routing))
  sat_N = None if previous is None else saturation.saturation(routing, previous)
  out = {}
  for i, layer in enumerate(routing.layers):
    out[f"routing/layer{layer}/load_cv"] = float(cv_N[i])
    out[f"routing/layer{layer}/coactivation_density"] = float(dens_N[i])
    if sat_N is not None:
      out[f"routing/layer{layer}/saturation_prev"] = float(sat_N[i])
  return out


def eval_metrics(cfg, variables: dict, inputs_BxL: np.ndarray,
                 previous: Routing | list[Routing] | None = None
                 ) -> tuple[dict[str, float], Routing | list[Routing]]:
  """(metrics, routing) of the model `variables` on one batch; pass the routing
  back as `previous` at the next evaluation. With a layer-wise schedule the
  routing is a list, one `Routing` per group of MoE layers of one shape
  (`layer_groups`)."""
  model = Model(cfg=cfg, variables=variables)
  groups = layer_groups(cfg)
  if len(groups) == 1:
    routing = capture(model, np.asarray(inputs_BxL))
    return routing_metrics(routing, previous), routing
  routings = [capture(model, np.asarray(inputs_BxL), layers=ls) for ls in groups.values()]
  out: dict[str, float] = {}
  for i, r in enumerate(routings):
    out.update(routing_metrics(r, None if previous is None else previous[i]))
  return out, routings
