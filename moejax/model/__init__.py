"""Decoder-only Transformer LM: pure `init` / `apply` over a Flax linen module.

Both are jit-compiled (and cached per config), so calling them eagerly from
tools and tests costs one compilation, not an op-by-op interpretation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from moejax import schedules
from moejax.model.counting import flops_per_token, param_counts
from moejax.model.transformer import TransformerLM


def make_model(cfg: ml_collections.ConfigDict, deterministic: bool = True) -> TransformerLM:
  return TransformerLM(ml_collections.FrozenConfigDict(cfg), deterministic)


@functools.lru_cache(maxsize=32)
def _jitted(frozen: ml_collections.FrozenConfigDict, deterministic: bool, fn: str):
  model = TransformerLM(frozen, deterministic)
  return jax.jit(getattr(model, fn))


def init(rng: jax.Array, cfg: ml_collections.ConfigDict) -> dict:
  """Variables {"params": ..., and non-trained collections such as "moe_state"}."""
  ids = jnp.zeros((1, cfg.train.seq_len), jnp.int32)
  return _jitted(ml_collections.FrozenConfigDict(cfg), True, "init")({"params": rng}, ids)


def apply(variables: dict, ids_BxL: jax.Array, cfg: ml_collections.ConfigDict,
          *, rng: jax.Array | None = None, step: int | jax.Array = 0
          ) -> tuple[jax.Array, dict]:
  """(logits [B, L, V] float32, aux). With `rng` the model runs in training mode, its
  training-time schedules (moejax/schedules.py) at optimizer step `step`."""
  fn = _jitted(ml_collections.FrozenConfigDict(cfg), rng is None, "apply")
  if rng is None:
    return fn(variables, ids_BxL)
  sv = schedules.values(schedules.all_schedules(cfg), jnp.asarray(step, jnp.int32))
  return fn(variables, ids_BxL, rngs={"router": rng}, schedule=sv)


__all__ = ["TransformerLM", "apply", "flops_per_token", "init", "make_model",
           "param_counts"]
