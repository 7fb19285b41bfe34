"""Shared by the attention tests: random parameters of a module's structure, jitted apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_params(mod, x, seed):
  """Random params of `mod`'s structure (from eval_shape: nothing compiled), every leaf
  random, biases and norm gains (near 1) included, so each is seen to be used."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    r = rng.standard_normal(a.shape)
    gain = any(getattr(k, "key", None) == "scale" for k in path)
    return ((1.0 + 0.3 * r) if gain else 0.4 * r).astype(np.float32)

  shapes = jax.eval_shape(mod.init, jax.random.key(0), jnp.asarray(x))["params"]
  return jax.tree_util.tree_map_with_path(draw, shapes)


def apply_jit(mod, params, *args):
  """One jitted program (much faster to compile on CPU than op-by-op dispatch)."""
  return np.asarray(jax.jit(mod.apply)({"params": params}, *args))
