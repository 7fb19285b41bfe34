"""Updates of routers' non-trained state ("moe_state") after an optimizer step.

State that is not a trained parameter (the aux-loss-free expert bias, the
ReLU router's L1 coefficient) lives in the "moe_state" variable collection,
stacked over MoE layers by the layer scan, and is updated from the step's
`state_stats` (counts over the whole global batch) by the router's pure
`update_state(state, stats, cfg)`, vmapped over layers. A router with
`pool_stats_over_layers = True` gets every layer's stats summed over all MoE
layers instead (one model-wide statistic, e.g. ReMoE's mean sparsity).

With a layer-wise expert schedule the stats come as a tuple with one entry
per MoE column (`moejax.layout.moe_columns`, the model's aux): each column's
state is updated with its own stats and its layers' `moe` config (E, k).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from moejax import layout
from moejax.moe import chain
from moejax.moe.routers import get_router


def _pooled(columns: list[dict]) -> list[dict]:
  """Every column's stats replaced by the sum over all MoE layers, broadcast per layer."""
  total = jax.tree.map(lambda *vs: functools.reduce(jnp.add, [jnp.sum(v, axis=0) for v in vs]),
                       *columns)
  return [jax.tree.map(lambda t, v: jnp.broadcast_to(t, v.shape), total, c) for c in columns]


def update_router_state(moe_state: dict, stats: dict | tuple,
                        cfg_moe: ml_collections.ConfigDict,
                        columns: tuple[layout.Column, ...] = ()) -> dict:
  """New "moe_state" collection; unchanged for routers that declare no state or stats.

  `stats` is {name: [num_moe_layers, ...]} for a model with one MoE stack, or (a
  scheduled model) a tuple over its MoE `columns` (`layout.moe_columns(cfg)`).
  With moe.chain.rounds > 1 (moejax/moe/chain.py; one MoE stack) `stats` holds
  {router name: that round's stats} and every round's router state is updated
  from its own; a router that pools over layers pools over the layers and the
  rounds.
  """
  router = get_router(cfg_moe.router)
  if not router.state_names(cfg_moe):
    return moe_state
  if isinstance(stats, dict):  # one MoE stack: a router per chain round
    names = chain.router_names(cfg_moe)
    if not stats:
      return moe_state
    stats = [stats[n] for n in names] if len(names) > 1 else [stats]
    shapes, paths = [None] * len(names), [layout.MOE_PATH + (n,) for n in names]
  else:
    if len(columns) != len(stats):
      raise ValueError(f"update_router_state: {len(stats)} MoE columns of stats but "
                       f"{len(columns)} columns")
    shapes = [c.shape for c in columns]
    paths = [c.path + (layout.ROUTER,) for c in columns]
  if not any(stats):
    return moe_state
  if router.pool_stats_over_layers:  # one model-wide statistic
    stats = _pooled(list(stats))
  for path, st, shape in zip(paths, stats, shapes):
    frozen = ml_collections.FrozenConfigDict(
        cfg_moe if shape is None else layout.layer_moe(cfg_moe, shape))
    node = layout.get(moe_state, path, "moe_state")
    new_node = jax.vmap(lambda s, x, f=frozen: router.update_state(s, x, f))(node, st)
    moe_state = layout.replace(moe_state, path, new_node)
  return moe_state
