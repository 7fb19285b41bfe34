"""Auxiliary-loss-free sigmoid router with a selection bias (DeepSeek-V3).

scores = sigmoid(logits); each token's k experts are *selected* by the top-k
of score + bias, but weighted by their unbiased scores normalised over the
selected k (`renormalize`; else the scores themselves), times
`routed_scaling` (DeepSeek-V3's norm_topk_prob and routed_scaling_factor).
With `num_groups` > 1 the selection is group-limited as in DeepSeek-V3
(n_group, topk_group): experts form `num_groups` contiguous groups, a group's
score is the sum of its two largest biased scores (one for groups of one
expert), and each token picks its k experts by biased score among its
`top_groups` best groups; the experts of the other groups are excluded
(-inf, as in DeepSeek's inference code and transformers' DeepseekV3
router). The per-expert bias [E] is not trained:
it lives in the "moe_state" collection and after every optimizer step moves
by `rate` towards balance, bias_i += rate * sign(mean load - load_i), with
loads counted over the whole global batch (moejax.moe.state). It only
changes which experts are picked, never the output weights or gradients.

`probs_TxE` (the switch balancing loss and the entropy / top-1 metrics) are
the scores normalised over all experts, scores / sum(scores). DeepSeek-V3
keeps a tiny complementary balancing loss; set moe.aux_loss_weight = 0 for
the purely auxiliary-loss-free variant. No z-loss (logits_TxE is None):
logsumexp has no meaning for independent sigmoid scores.

Options under `moe.sigmoid_bias`: rate (bias update speed), routed_scaling,
renormalize, num_groups, top_groups.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import fail, positive, positive_int
from moejax.moe.metrics import Metric
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.routers.group_limited import check_top_groups, group_mask
from moejax.moe.types import Assignment


def sigmoid_bias_route(logits_TxE: jax.Array, bias_E: jax.Array, k: int,
                       routed_scaling: float = 1.0, renormalize: bool = True,
                       num_groups: int = 1, top_groups: int = 1
                       ) -> tuple[Assignment, jax.Array]:
  """Pure routing math; returns (assignment, probs_TxE = normalised scores).

  Slots are choice-major like `topk_route` (slot c*T + t is token t's c-th
  choice, by biased score).
  """
  scores_TxE = jax.nn.sigmoid(logits_TxE.astype(jnp.float32))
  t = scores_TxE.shape[0]
  biased_TxE = jax.lax.stop_gradient(scores_TxE + bias_E.astype(jnp.float32))
  if num_groups > 1:  # DeepSeek-V3's group-limited selection on the biased scores
    biased_TxE = jnp.where(group_mask(biased_TxE, num_groups, top_groups), biased_TxE,
                           -jnp.inf)
  _, e_TxK = jax.lax.top_k(biased_TxE, k)
  s_TxK = jnp.take_along_axis(scores_TxE, e_TxK, axis=-1)
  if renormalize:
    s_TxK = s_TxK / jnp.sum(s_TxK, axis=-1, keepdims=True)
  w_TxK = routed_scaling * s_TxK
  assignment = Assignment(
      token=jnp.tile(jnp.arange(t, dtype=jnp.int32), k),
      expert=e_TxK.T.reshape(-1).astype(jnp.int32),
      weight=w_TxK.T.reshape(-1),
      valid=jnp.ones((t * k,), bool),
  )
  probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
  return assignment, probs_TxE


def update_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
  """bias_i + rate * sign(mean load - load_i): underloaded experts move up."""
  counts_E = counts_E.astype(jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)


@register("sigmoid_bias")
class SigmoidBiasRouter(Router):
  """Linear gate + `sigmoid_bias_route`; the bias is "moe_state" "bias" [E]."""

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    return ("bias",)

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return (Metric("bias_norm"),)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    opts = cfg.moe.sigmoid_bias
    for key in ("moe.sigmoid_bias.rate", "moe.sigmoid_bias.routed_scaling"):
      positive(cfg, key)
    for key in ("moe.sigmoid_bias.num_groups", "moe.sigmoid_bias.top_groups"):
      positive_int(cfg, key)
    if not chosen:
      return
    e = cfg.moe.num_experts
    if e % opts.num_groups:
      fail("moe.sigmoid_bias.num_groups", opts.num_groups, f"must divide moe.num_experts={e}")
    check_top_groups(cfg, "moe.sigmoid_bias", opts.num_groups, opts.top_groups)

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    e = self.cfg.num_experts
    if self.has_variable("moe_state", "bias") or self.is_mutable_collection("moe_state"):
      bias_E = self.variable("moe_state", "bias", jnp.zeros, (e,), jnp.float32).value
    else:  # applied without its "moe_state" (a fresh model): the initial bias
      bias_E = jnp.zeros((e,), jnp.float32)
    logits_TxE = gate_logits(self, x_TxD, e)
    opts = self.cfg.sigmoid_bias
    assignment, probs_TxE = sigmoid_bias_route(
        logits_TxE, bias_E, self.cfg.top_k, opts.routed_scaling, opts.renormalize,
        opts.num_groups, opts.top_groups)
    counts_E = jax.lax.stop_gradient(assignment.expert_counts(e))
    return RouterOutput(assignment=assignment, logits_TxE=None, probs_TxE=probs_TxE,
                        metrics={"bias_norm": jnp.linalg.norm(bias_E)},
                        state_stats={"counts": counts_E})

  @classmethod
  def update_state(cls, state: dict, stats: dict, cfg: ml_collections.FrozenConfigDict) -> dict:
    """One layer's new "moe_state" from the step's global-batch counts [E]."""
    return {**state, "bias": update_bias(state["bias"], stats["counts"],
                                         cfg.sigmoid_bias.rate)}
