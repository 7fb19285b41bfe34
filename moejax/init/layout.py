"""Where each model layer's parameters live in the scanned parameter tree."""

from __future__ import annotations

import ml_collections

from moejax.model.transformer import layer_plan


def layer_location(cfg: ml_collections.ConfigDict, layer: int) -> tuple[str, str, int]:
  """(scanned stack, block name, index along the stack) holding model layer `layer`.

  The first layer_plan()[0] layers are "dense_layers"/block0[i]; the rest are
  periods of moe.every layers in "moe_layers", the MoE layer being block0.
  """
  n_dense, _ = layer_plan(cfg)
  if layer < n_dense:
    return "dense_layers", "block0", layer
  j = layer - n_dense
  every = cfg.moe.every
  return "moe_layers", f"block{j % every}", j // every


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  stack, block, _ = layer_location(cfg, layer)
  return stack == "moe_layers" and block == "block0"
