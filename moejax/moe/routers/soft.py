"""Soft MoE router (Puigcerver et al. 2023) as Mixture of Tokens for decoders.

Learnable slot parameters phi [D, S] with S = E * slots_per_expert; inputs
(over D) and phi's columns are L2-normalised and the logits scaled by a
learned scalar (init 1), logits = scale * x_hat . phi_hat. Within a group of
M tokens, dispatch = softmax over the group's tokens for each slot and
combine = softmax over the slots for each token (a `SoftAssignment`, applied
by moejax.moe.dispatch.soft whatever `moe.dispatch` says).

Causality: tokens are mixed only across the batch at one sequence position
(G = L groups of M = B tokens; never along the sequence), as in Mixture of
Tokens, so position t never sees later positions. Outputs do depend on the
other sequences in the batch. With batch size 1 each group has one token, so
every slot takes that token with dispatch weight 1 and the layer becomes a
dense per-token mixture sum_s combine_s * expert_{s // slots}(x_t) (no
token mixing: evaluation at batch 1 differs from training batches).

`probs_TxE` are each token's combine mass per expert (entropy / top-1
metrics; the switch loss with uniform load is constant 1); no z-loss.

Options under `moe.soft`: slots_per_expert.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import positive
from moejax.layers import fan_in_init
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput
from moejax.moe.types import SoftAssignment


def batch_groups(b: int, l: int) -> jax.Array:
  """[L, B] int32 flat token ids (t = b * L + l) grouped by position l."""
  return (jnp.arange(b, dtype=jnp.int32)[None, :] * l
          + jnp.arange(l, dtype=jnp.int32)[:, None])


def soft_route(logits_TxS: jax.Array, token_GxM: jax.Array) -> SoftAssignment:
  """Pure Soft MoE weights from per-token slot logits and a token grouping."""
  logits_GxMxS = logits_TxS.astype(jnp.float32)[token_GxM]
  return SoftAssignment(token=token_GxM.astype(jnp.int32),
                        dispatch=jax.nn.softmax(logits_GxMxS, axis=1),
                        combine=jax.nn.softmax(logits_GxMxS, axis=2))


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-6)


@register("soft")
class SoftRouter(Router):
  """Normalised slot logits + `soft_route` over batch-at-one-position groups."""


  @classmethod
  def decode_refusal(cls, cfg) -> str | None:
    del cfg
    return ("moe.router='soft': each slot mixes the tokens at one position across the "
            "batch, so a token's output depends on the other sequences; routed one token "
            "at a time every slot would hold that token alone, which is not the routing "
            "the model was trained with")

  @classmethod
  def expert_embedding(cls, cfg_moe):
    del cfg_moe
    return None  # its parameters embed slots (slots_per_expert each), not experts

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    del chosen
    positive(cfg, "moe.soft.slots_per_expert")

  @classmethod
  def param_count(cls, cfg: ml_collections.ConfigDict, d_model: int) -> int:
    """Router parameters per MoE layer."""
    return d_model * cfg.num_experts * cfg.soft.slots_per_expert + 1

  @classmethod
  def experts_per_token(cls, cfg: ml_collections.ConfigDict) -> float:
    """Expert applications per token: E * slots_per_expert slots per group of B tokens."""
    return cfg.moe.num_experts * cfg.moe.soft.slots_per_expert / cfg.train.batch_size

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del token_ids, deterministic, carry, shared
    e, spe = self.cfg.num_experts, self.cfg.soft.slots_per_expert
    t, d = x_TxD.shape
    phi_DxS = self.param("phi", fan_in_init(d), (d, e * spe))
    scale = self.param("scale", nn.initializers.ones, ())
    x_hat = _l2_normalize(x_TxD.astype(jnp.float32), axis=-1)
    logits_TxS = scale * jnp.dot(x_hat, _l2_normalize(phi_DxS, axis=0),
                                 precision="highest")
    b, l = shape_BxL
    assignment = soft_route(logits_TxS, batch_groups(b, l))
    # Combine mass per expert for each flat token (every token in one group).
    mass_GxMxE = jnp.sum(assignment.combine.reshape(
        assignment.combine.shape[:2] + (e, spe)), axis=-1)
    probs_TxE = jnp.zeros((t, e), jnp.float32).at[assignment.token].set(mass_GxMxE)
    return RouterOutput(assignment=assignment, logits_TxE=None, probs_TxE=probs_TxE)
