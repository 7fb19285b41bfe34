"""Null experts (AdaMoE, Zeng et al. 2024): learn how many real experts to use.

The gate scores E real experts plus `moe.null_experts.num_null` null experts
that output zero and cost no FLOPs. The softmax and the top-k run over all
E + num_null choices; a slot that picks a null expert is invalid in the
`Assignment` (its expert index clipped into [0, E), weight 0), so a token
uses between 0 and k real experts. `probs_TxE` and `balance_counts_E` cover
all E + num_null choices (null picks counted), so the switch balancing loss
spreads load over null experts too, as in AdaMoE.

Weights (option `moe.null_experts.renormalize`, default True): each pick's
probability divided by the sum over the token's k picks *including* nulls.
The null picks' share of that sum multiplies a zero output, so a token that
picks nulls gets real-expert weights summing to less than 1 (its FFN output
is scaled down, the behaviour AdaMoE learns with). With renormalize=False
the weights are the raw softmax probabilities over E + num_null.

Slots are choice-major like `topk` (slot c*T + t), A = T * k. Metric
`null_fraction`: share of the T * k slots that went to null experts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import positive
from moejax.moe.metrics import Metric
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment


def null_experts_route(logits_TxN: jax.Array, k: int, num_experts: int,
                       renormalize: bool = True
                       ) -> tuple[Assignment, jax.Array, jax.Array, jax.Array]:
  """Top-k over E real + null choices (logits [T, E + num_null]).

  Returns (assignment over the E real experts, probs_TxN, balance counts
  [E + num_null] of all k picks, null_fraction).
  """
  logits_TxN = logits_TxN.astype(jnp.float32)
  t, n = logits_TxN.shape
  probs_TxN = jax.nn.softmax(logits_TxN, axis=-1)
  w_TxK, e_TxK = jax.lax.top_k(probs_TxN, k)
  if renormalize:
    w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  real_TxK = e_TxK < num_experts
  choice_major = lambda a: a.T.reshape(-1)  # noqa: E731
  assignment = Assignment(
      token=jnp.tile(jnp.arange(t, dtype=jnp.int32), k),
      expert=choice_major(jnp.minimum(e_TxK, num_experts - 1).astype(jnp.int32)),
      weight=choice_major(jnp.where(real_TxK, w_TxK, 0.0)),
      valid=choice_major(real_TxK))
  counts_N = jnp.sum(jax.nn.one_hot(e_TxK, n, dtype=jnp.float32), axis=(0, 1))
  null_fraction = 1.0 - jnp.mean(real_TxK.astype(jnp.float32))
  return assignment, probs_TxN, counts_N, null_fraction


@register("null_experts")
class NullExpertsRouter(Router):
  """Linear gate over E + num_null choices + `null_experts_route`."""

  adaptive = True

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return (Metric("null_fraction", summary=True),)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    del chosen
    positive(cfg, "moe.null_experts.num_null")

  @classmethod
  def param_count(cls, cfg_moe: ml_collections.ConfigDict, d_model: int) -> int:
    return d_model * (cfg_moe.num_experts + cfg_moe.null_experts.num_null)

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    opts = self.cfg.null_experts
    e = self.cfg.num_experts
    logits_TxN = gate_logits(self, x_TxD, e + opts.num_null)
    assignment, probs_TxN, counts_N, null_fraction = null_experts_route(
        logits_TxN, self.cfg.top_k, e, opts.renormalize)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxN,
                        probs_TxE=probs_TxN, balance_counts_E=counts_N,
                        metrics={"null_fraction": null_fraction})
