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

from moejax.moe.routers import get_router

# Where the scanned MoE layers keep their router's variables.
ROUTER_PATH = ("moe_layers", "block0", "moe", "router")


def update_router_state(moe_state: dict, stats: dict,
                        cfg_moe: ml_collections.ConfigDict) -> dict:
  """New "moe_state" collection; unchanged for routers without `update_state`."""
  router = get_router(cfg_moe.router)
  if not stats or not hasattr(router, "update_state"):
    return moe_state
  node = moe_state
  for k in ROUTER_PATH:
    node = node[k]
  if getattr(router, "pool_stats_over_layers", False):  # one model-wide statistic
    stats = jax.tree.map(
        lambda v: jnp.broadcast_to(jnp.sum(v, axis=0, keepdims=True), v.shape), stats)
  frozen = ml_collections.FrozenConfigDict(cfg_moe)
  new_node = jax.vmap(lambda s, st: router.update_state(s, st, frozen))(node, stats)
  return _replace(moe_state, ROUTER_PATH, new_node)


def _replace(tree: dict, path: tuple[str, ...], value) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}
