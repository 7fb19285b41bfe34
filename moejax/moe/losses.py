"""Auxiliary routing losses: pure functions, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def switch_load_balance(probs_TxE: jax.Array, counts_E: jax.Array,
                        num_experts: jax.Array | int | None = None) -> jax.Array:
  """Switch Transformer balancing loss E * sum_i f_i * P_i.

  f_i is the fraction of the (valid) assignments that went to expert i and
  P_i the mean router probability of expert i. Equals 1 at perfect balance.
  `num_experts` (default: the probabilities' last dim) is the E in front, for
  routers whose choices include masked-out experts (probability 0).
  """
  num_experts = probs_TxE.shape[-1] if num_experts is None else num_experts
  f_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
  p_E = jnp.mean(probs_TxE.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  z_T = jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)
  return jnp.mean(z_T * z_T)


def sequence_load_balance(probs_TxE: jax.Array, counts_BxE: jax.Array,
                          batch: int) -> jax.Array:
  """Switch balance computed within each sequence, averaged over sequences.

  Tokens are batch-major (token t belongs to sequence t // L); counts_BxE are
  the per-sequence valid assignment counts (DeepSeek-V3's sequence-wise loss).
  """
  num_experts = probs_TxE.shape[-1]
  p_BxE = jnp.mean(probs_TxE.astype(jnp.float32).reshape(batch, -1, num_experts), axis=1)
  f_BxE = counts_BxE / jnp.maximum(jnp.sum(counts_BxE, axis=-1, keepdims=True), 1.0)
  return num_experts * jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


# moe.balance names -> the loss key each adds (all weighted by moe.aux_loss_weight).
BALANCE_KINDS = {"switch": "load_balance", "global_batch": "global_balance",
                 "sequence": "sequence_balance"}
BALANCE_LOSSES = tuple(BALANCE_KINDS.values())


def balance_kinds(cfg_moe) -> tuple[str, ...]:
  """The balancing losses selected by `moe.balance` (comma-separated, may be "")."""
  kinds = tuple(k.strip() for k in cfg_moe.balance.split(",") if k.strip())
  for k in kinds:
    if k not in BALANCE_KINDS:
      raise ValueError(f"config key moe.balance={cfg_moe.balance!r} is invalid: {k!r} is "
                       f"not a balancing loss; allowed (comma-separated): {sorted(BALANCE_KINDS)}")
  return kinds
