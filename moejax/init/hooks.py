"""What the trainer calls for init.* and moe.adapters (identity for other runs).

- `initial_variables`: the fresh model variables, rebuilt from a source run:
  upcycled from a dense run (init.from_dense), grown from an MoE run
  (init.grow_from), or an adapter model on a frozen base run
  (moe.adapters.base: base parameters loaded, adapter masks set).
- `wrap_optimizer`: adapter runs update only adapter and router parameters
  (optax.multi_transform; the base gets `set_to_zero`, so it stays
  bit-identical and holds no optimizer state).
- `checkpoint_view` / `from_checkpoint`: adapter runs checkpoint only the
  trainable parameters; the base is re-read from the base run (named by
  moe.adapters.base in config.json) when the run resumes.
- `summary_fields`: trainable vs frozen parameter counts for summary.json.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax.init import grow
from moejax.layout import layer_location
from moejax.init.sources import load_run, run_config
from moejax.init.upcycle import upcycle_params
from moejax.moe import adapters as ad
from moejax.moe.experts import get_family
from moejax.train import data as data_lib


def set_adapter_masks(cfg: ml_collections.ConfigDict, mask_collection: dict) -> dict:
  """The "adapter_mask" collection with the first n_l experts of layer l valid."""
  out = jax.tree.map(jnp.zeros_like, mask_collection)
  for layer, count in enumerate(ad.layer_counts(cfg)):
    stack, block, idx = layer_location(cfg, layer)
    for module, leaves in out[stack][block].items():
      v = leaves["valid"]
      out[stack][block][module] = {"valid": v.at[idx].set(jnp.arange(v.shape[-1]) < count)}
  return out


def merge_base(params: dict, base: dict, path: str = "") -> dict:
  """`params` with every non-adapter leaf taken from `base` (shapes must match)."""
  out = {}
  for k, v in params.items():
    here = f"{path}/{k}" if path else k
    if k in ad.MODULE_NAMES.values():
      out[k] = v
    elif k not in base:
      raise ValueError(f"parameter {here} is missing from the base run "
                       "(moe.adapters.base must be trained with the same model.*/moe.* keys)")
    elif isinstance(v, dict):
      out[k] = merge_base(v, base[k], here)
    elif tuple(v.shape) != tuple(base[k].shape):
      raise ValueError(f"parameter {here} has shape {tuple(base[k].shape)} in the base run, "
                       f"{tuple(v.shape)} in this model (moe.adapters.base must match)")
    else:
      out[k] = jnp.asarray(base[k], v.dtype)
  return out


def _same_shapes(new: Any, like: Any, what: str) -> Any:
  got = jax.tree.map(lambda a: tuple(a.shape), new)
  want = jax.tree.map(lambda a: tuple(a.shape), like)
  if got != want:
    raise ValueError(f"{what}: the rebuilt parameters do not have this config's shapes")
  return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), new, like)


def initial_variables(cfg: ml_collections.ConfigDict, variables: dict) -> dict:
  """Fresh `variables` (lm.init) rebuilt from the source run the config names."""
  init = cfg.get("init")
  params = variables["params"]
  collections = {k: v for k, v in variables.items() if k != "params"}
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 7919)
  if init is not None and init.from_dense:
    dense, _, _ = load_run(init.from_dense, init.step)
    params = upcycle_params(dense, params, cfg, mode=init.upcycle, noise=init.noise,
                            router=init.get("router", "fresh"), rng=rng)
  elif init is not None and init.grow_from:
    params, collections = _grown(cfg, params, collections, rng)
  a = ad.adapters_cfg(cfg)
  if a is not None:
    base, base_collections, _ = load_run(a.base)
    params = merge_base(params, base)
    for k, v in base_collections.items():
      if k in collections:
        collections[k] = _same_shapes(v, collections[k], f"moe.adapters.base collection {k}")
    collections[ad.MASK_COLLECTION] = set_adapter_masks(cfg, collections[ad.MASK_COLLECTION])
  return {"params": params, **collections}


def _grown(cfg: ml_collections.ConfigDict, params: dict, collections: dict,
           rng: jax.Array) -> tuple[dict, dict]:
  """(params, collections) of init.grow_from grown into `cfg`'s experts (moejax/init/grow.py)."""
  init = cfg.init
  what = f"init.grow_from={init.grow_from!r}"
  src_cfg = run_config(init.grow_from)
  src, src_collections, _ = load_run(init.grow_from, init.step)
  p = grow.num_periods(src)
  if init.get("grow_select", "all") == "importance":
    data = data_lib.from_config(cfg)
    it = data.train_iterator(cfg.train.batch_size, seed=(cfg.seed + 104729) % 2**32)
    batches = [next(it) for _ in range(init.grow_batches)]
    score_PxE = grow.expert_importance(src_cfg, src, src_collections, batches)
    src_PxE = grow.dhondt_copies(score_PxE, cfg.moe.num_experts)
    print(f"init.grow_select='importance': expert importance per MoE period "
          f"{np.round(score_PxE, 6).tolist()}; copies "
          f"{[np.bincount(r, minlength=score_PxE.shape[1]).tolist() for r in src_PxE]}")
  else:
    src_PxE = grow.all_copies(src_cfg.moe.num_experts, p, init.grow_factor)
  params = _same_shapes(grow.grow_params(src, src_PxE, init.grow_noise, rng,
                                        get_family(cfg.moe)), params, what)
  if cfg.moe.topk.get("grown_groups", 0) > 0:
    group_PxE = grow.source_groups(src_cfg, src_collections, p)
    collections = grow.set_groups(collections, np.take_along_axis(group_PxE, src_PxE, axis=1))
  return params, collections


def wrap_optimizer(cfg: ml_collections.ConfigDict,
                   tx: optax.GradientTransformation) -> optax.GradientTransformation:
  if ad.adapters_cfg(cfg) is None:
    return tx
  return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()},
                               ad.trainable_labels)


def checkpoint_view(cfg: ml_collections.ConfigDict, state: dict) -> dict:
  """What is saved: the state, with only the adapter parameters for adapter runs."""
  if ad.adapters_cfg(cfg) is None:
    return state
  return {**state, "params": ad.split_trainable(state["params"])}


def from_checkpoint(cfg: ml_collections.ConfigDict, state: dict, saved: dict) -> dict:
  """The full state from a restored `checkpoint_view` (base params from `state`)."""
  if ad.adapters_cfg(cfg) is None:
    return saved
  return {**saved, "params": ad.merge_trainable(state["params"], saved["params"])}


def summary_fields(cfg: ml_collections.ConfigDict, params: dict) -> dict[str, Any]:
  """summary.json entries: trainable vs frozen parameters and the source run."""
  a = ad.adapters_cfg(cfg)
  if a is None:  # plain runs keep their summary (and sweeps' results.csv) unchanged
    init = cfg.get("init")
    if init is not None and (init.from_dense or init.grow_from):
      return {"init_source": os.path.abspath(init.from_dense or init.grow_from)}
    return {}
  total, stored = ad.count_leaves(params), ad.count_leaves(ad.split_trainable(params))
  return {"params_trainable": ad.trainable_param_count(cfg),
          "params_frozen": total - stored,
          "params_adapter_stored": stored,  # includes padding experts of the scanned stacks
          "adapter_base_run": os.path.abspath(a.base)}
