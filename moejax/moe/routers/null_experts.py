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

The null experts are zero-computation choices of kind "zero"
(`zero_computation`, moejax/moe/zero_experts.py): the routing is the
`zero_experts` router's `zero_choice_route` without a bias, and the MoE
layer has nothing to add for them.
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
from moejax.moe.routers.zero_experts import zero_choice_route
from moejax.moe.types import Assignment
from moejax.moe.zero_experts import ZeroComputation


def null_experts_route(logits_TxN: jax.Array, k: int, num_experts: int,
                       renormalize: bool = True
                       ) -> tuple[Assignment, jax.Array, jax.Array, jax.Array]:
  """Top-k over E real + null choices (logits [T, E + num_null]).

  Returns (assignment over the E real experts, probs_TxN, balance counts
  [E + num_null] of all k picks, null_fraction).
  """
  assignment, probs_TxN, _, counts_N, e_TxK = zero_choice_route(
      logits_TxN, k, num_experts, None, renormalize)
  return assignment, probs_TxN, counts_N, _null_fraction(e_TxK, num_experts)


def _null_fraction(e_TxK: jax.Array, num_experts: int) -> jax.Array:
  """Share of the T * k picks that went to null experts."""
  return 1.0 - jnp.mean((e_TxK < num_experts).astype(jnp.float32))


@register("null_experts")
class NullExpertsRouter(Router):
  """Linear gate over E + num_null choices + `null_experts_route`."""

  adaptive = True

  @classmethod
  def zero_computation(cls, cfg_moe) -> ZeroComputation:
    return ZeroComputation(zero=cfg_moe.null_experts.num_null)

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
    assignment, probs_TxN, zero_TxZ, counts_N, e_TxK = zero_choice_route(
        logits_TxN, self.cfg.top_k, e, None, opts.renormalize)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxN,
                        probs_TxE=probs_TxN, balance_counts_E=counts_N,
                        metrics={"null_fraction": _null_fraction(e_TxK, e)},
                        zero_weights_TxZ=zero_TxZ)
