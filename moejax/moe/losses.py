"""Auxiliary routing losses: pure functions, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def switch_load_balance(probs_TxE: jax.Array, counts_E: jax.Array) -> jax.Array:
  """Switch Transformer balancing loss E * sum_i f_i * P_i.

  f_i is the fraction of the (valid) assignments that went to expert i and
  P_i the mean router probability of expert i. Equals 1 at perfect balance.
  """
  num_experts = probs_TxE.shape[-1]
  f_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  p_E = jnp.mean(probs_TxE.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  z_T = jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)
  return jnp.mean(z_T * z_T)
