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
towards balance, by default bias_i += rate * sign(mean load - load_i), with
loads counted over the whole global batch (moejax.moe.state). It only
changes which experts are picked, never the output weights or gradients.

The primal-dual reading (Han & Zhong 2025, "A Theoretical Framework for
Auxiliary-Loss-Free Load Balancing of Sparse Mixture-of-Experts in
Large-Scale AI Models", arXiv:2512.03915): the bias is the dual variable of
the per-expert load constraints of the assignment problem max sum s x
(each token k experts, each expert L = mean load), top-k of s + bias is the
primal step, and the update is one dual step bias_i += eps_i (L - load_i).
DeepSeek's rule is the step eps_i = rate / |L - load_i|, i.e. the sign;
the plain dual (sub)gradient step is `update_rule="proportional"`, bias_i +=
rate_n * (L - load_i) / L (the load error relative to L, so `rate` does not
depend on the batch size). The analysis' online regret bound needs step
sizes that decay with the update count n; `schedule` gives rate_n = rate
("constant"), rate / sqrt(n) ("inv_sqrt") or rate / n ("inv"), with n =
1, 2, ... kept as the int32 "moe_state" "updates" (absent with "constant").

`probs_TxE` (the switch balancing loss and the entropy / top-1 metrics) are
the scores normalised over all experts, scores / sum(scores). DeepSeek-V3
keeps a tiny complementary balancing loss; set moe.aux_loss_weight = 0 for
the purely auxiliary-loss-free variant. No z-loss (logits_TxE is None):
logsumexp has no meaning for independent sigmoid scores.

Options under `moe.sigmoid_bias`: rate (bias update speed), update_rule (sign,
proportional), schedule (constant, inv_sqrt, inv), routed_scaling,
renormalize, num_groups, top_groups.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import choice, fail, positive, positive_int
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
  biased_TxE = jax.lax.stop_gradient(scores_TxE + bias_E.astype(jnp.float32))
  if num_groups > 1:  # DeepSeek-V3's group-limited selection on the biased scores
    biased_TxE = jnp.where(group_mask(biased_TxE, num_groups, top_groups), biased_TxE,
                           -jnp.inf)
  _, e_TxK = jax.lax.top_k(biased_TxE, k)
  s_TxK = jnp.take_along_axis(scores_TxE, e_TxK, axis=-1)
  if renormalize:
    s_TxK = s_TxK / jnp.sum(s_TxK, axis=-1, keepdims=True)
  w_TxK = routed_scaling * s_TxK
  assignment = Assignment.from_choices(e_TxK, w_TxK)
  probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
  return assignment, probs_TxE


UPDATES = ("sign", "proportional")
SCHEDULES = ("constant", "inv_sqrt", "inv")


def update_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float | jax.Array,
                update: str = "sign") -> jax.Array:
  """One dual step towards balance: underloaded experts move up.

  "sign": bias_i + rate * sign(mean load - load_i) (DeepSeek);
  "proportional": bias_i + rate * (mean load - load_i) / mean load.
  """
  counts_E = counts_E.astype(jnp.float32)
  if update == "sign":
    return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)
  if update == "proportional":
    mean = jnp.mean(counts_E)
    return bias_E + rate * (mean - counts_E) / jnp.maximum(mean, 1e-12)
  raise ValueError(f"moe.sigmoid_bias.update_rule={update!r}; allowed: {UPDATES}")


def step_size(rate: float, n: jax.Array, schedule: str) -> jax.Array:
  """float32 step of the n-th update (n = 1, 2, ...) under `schedule`."""
  n = jnp.asarray(n, jnp.float32)
  if schedule == "constant":
    return jnp.full((), rate, jnp.float32)
  if schedule == "inv_sqrt":
    return rate / jnp.sqrt(n)
  if schedule == "inv":
    return rate / n
  raise ValueError(f"moe.sigmoid_bias.schedule={schedule!r}; allowed: {SCHEDULES}")


@register("sigmoid_bias")
class SigmoidBiasRouter(Router):
  """Linear gate + `sigmoid_bias_route`; the bias is "moe_state" "bias" [E]."""

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    return ("bias",) if cfg_moe.sigmoid_bias.schedule == "constant" else ("bias", "updates")

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return (Metric("bias_norm"),)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    opts = cfg.moe.sigmoid_bias
    choice(opts.update_rule, "moe.sigmoid_bias.update_rule", UPDATES)
    choice(opts.schedule, "moe.sigmoid_bias.schedule", SCHEDULES)
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
    opts = self.cfg.sigmoid_bias
    if opts.schedule != "constant" and (self.has_variable("moe_state", "updates")
                                        or self.is_mutable_collection("moe_state")):
      self.variable("moe_state", "updates", jnp.zeros, (), jnp.int32)  # the update count n
    logits_TxE = gate_logits(self, x_TxD, e)
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
    opts = cfg.sigmoid_bias
    if opts.schedule == "constant":  # no update count kept
      return {**state, "bias": update_bias(state["bias"], stats["counts"], opts.rate,
                                           opts.update_rule)}
    n = state["updates"] + 1
    bias = update_bias(state["bias"], stats["counts"], step_size(opts.rate, n, opts.schedule),
                       opts.update_rule)
    return {**state, "bias": bias, "updates": n}
