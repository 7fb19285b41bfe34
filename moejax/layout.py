"""Where everything lives in the parameter tree: layer stacks, MoE layers, routers, experts.

The model scans its layers in two stacks (`lax.scan`, so compile time does
not grow with depth): the first `moe.first_dense_layers` layers as
"dense_layers" (one block per scan step), the rest as "moe_layers", a stack
of identical periods of `moe.every` blocks whose first block ("block0") holds
the MoE FFN ("moe"). Every leaf of a stack has a leading scan axis. So the
MoE layers' variables, in every collection (params, moe_state,
intermediates, ...), live under

  moe_layers / block0 / moe / {router, experts, shared, shared_gate, zero_experts}

with period p of the stack being model layer `moe_layer_indices(cfg)[p]`.
With moe.chain.rounds = C > 1 (Chain-of-Experts, moejax/moe/chain.py) the
routers of rounds 2..C sit beside `router` as `router_round2`, ...
Every module that needs a path asks this one.
"""

from __future__ import annotations

from typing import Any

import ml_collections

DENSE_STACK = "dense_layers"
MOE_STACK = "moe_layers"
MOE_BLOCK = "block0"
MOE = "moe"
ROUTER = "router"
EXPERTS = "experts"
SHARED = "shared"
ZERO_EXPERTS = "zero_experts"  # copy / constant experts (moejax/moe/zero_experts.py)
MOE_PATH = (MOE_STACK, MOE_BLOCK, MOE)
ROUTER_PATH = MOE_PATH + (ROUTER,)
EXPERTS_PATH = MOE_PATH + (EXPERTS,)


def layer_plan(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(number of leading dense layers, number of periods of moe.every layers)."""
  m, moe = cfg.model, cfg.moe
  if not moe.enabled:
    return m.num_layers, 0
  return moe.first_dense_layers, (m.num_layers - moe.first_dense_layers) // moe.every


def layer_location(cfg: ml_collections.ConfigDict, layer: int) -> tuple[str, str, int]:
  """(scanned stack, block name, index along the stack) holding model layer `layer`."""
  n_dense, _ = layer_plan(cfg)
  if layer < n_dense:
    return DENSE_STACK, "block0", layer
  j = layer - n_dense
  every = cfg.moe.every
  return MOE_STACK, f"block{j % every}", j // every


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  stack, block, _ = layer_location(cfg, layer)
  return stack == MOE_STACK and block == MOE_BLOCK


def moe_layer_indices(cfg: ml_collections.ConfigDict) -> list[int]:
  """Model layer index of each MoE layer, in the order the MoE stack holds them."""
  n_dense, n_periods = layer_plan(cfg)
  return [n_dense + p * cfg.moe.every for p in range(n_periods)]


def get(tree: dict, path: tuple[str, ...], what: str = "tree") -> Any:
  """tree[path[0]][path[1]]...; a KeyError names the missing part."""
  node = tree
  for i, k in enumerate(path):
    if not isinstance(node, dict) or k not in node:
      raise KeyError(f"{what} has no {'/'.join(path[:i + 1])} (this model has no MoE "
                     "layers there)")
    node = node[k]
  return node


def has(tree: dict, path: tuple[str, ...]) -> bool:
  try:
    get(tree, path)
  except KeyError:
    return False
  return True


def replace(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of `tree` with the node at `path` set (parents copied or created, siblings shared)."""
  if not path:
    return value
  return {**tree, path[0]: replace(tree.get(path[0], {}), path[1:], value)}


def moe_params(params: dict) -> dict:
  """The stacked MoE-layer params {router, experts, [shared, shared_gate]} (each leaf
  [P, ...])."""
  return get(params, MOE_PATH, "the parameter tree")
