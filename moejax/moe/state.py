"""Updates of routers' non-trained state ("moe_state") after an optimizer step.

State that is not a trained parameter (the aux-loss-free expert bias, the
ReLU router's L1 coefficient) lives in the "moe_state" variable collection,
stacked over MoE layers by the layer scan, and is updated from the step's
`state_stats` (counts over the whole global batch) by the router's pure
`update_state(state, stats, cfg)`, vmapped over layers. A router with
`pool_stats_over_layers = True` gets every layer's stats summed over all MoE
layers instead (one model-wide statistic, e.g. ReMoE's mean sparsity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from moejax import layout
from moejax.moe.routers import get_router


def update_router_state(moe_state: dict, stats: dict,
                        cfg_moe: ml_collections.ConfigDict) -> dict:
  """New "moe_state" collection; unchanged for routers that declare no state or stats."""
  router = get_router(cfg_moe.router)
  if not stats or not router.state_names(cfg_moe):
    return moe_state
  node = layout.get(moe_state, layout.ROUTER_PATH, "moe_state")
  if router.pool_stats_over_layers:  # one model-wide statistic
    stats = jax.tree.map(
        lambda v: jnp.broadcast_to(jnp.sum(v, axis=0, keepdims=True), v.shape), stats)
  frozen = ml_collections.FrozenConfigDict(cfg_moe)
  new_node = jax.vmap(lambda s, st: router.update_state(s, st, frozen))(node, stats)
  return layout.replace(moe_state, layout.ROUTER_PATH, new_node)
