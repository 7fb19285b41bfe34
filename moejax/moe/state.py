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

import functools

import jax
import jax.numpy as jnp
import ml_collections

from moejax import layout
from moejax.moe import chain
from moejax.moe.routers import get_router


def update_router_state(moe_state: dict, stats: dict,
                        cfg_moe: ml_collections.ConfigDict) -> dict:
  """New "moe_state" collection; unchanged for routers that declare no state or stats.

  With moe.chain.rounds > 1 (moejax/moe/chain.py) `stats` holds {router name:
  that round's stats} and every round's router state is updated from its own;
  a router that pools over layers pools over the layers and the rounds.
  """
  router = get_router(cfg_moe.router)
  if not stats or not router.state_names(cfg_moe):
    return moe_state
  names = chain.router_names(cfg_moe)
  per_router = stats if len(names) > 1 else {names[0]: stats}
  if router.pool_stats_over_layers:  # one model-wide statistic
    total = jax.tree.map(lambda *v: functools.reduce(
        jnp.add, [jnp.sum(a, axis=0, keepdims=True) for a in v]), *(per_router[n] for n in names))
    per_router = {n: jax.tree.map(lambda t, v: jnp.broadcast_to(t, v.shape), total,
                                  per_router[n]) for n in names}
  frozen = ml_collections.FrozenConfigDict(cfg_moe)
  for name in names:
    path = layout.MOE_PATH + (name,)
    node = layout.get(moe_state, path, "moe_state")
    new_node = jax.vmap(lambda s, st: router.update_state(s, st, frozen))(node, per_router[name])
    moe_state = layout.replace(moe_state, path, new_node)
  return moe_state
