"""Zero-computation experts router (MoE++, LongCat-Flash): a budget of FFN experts per token.

MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with
Zero-Computation Experts") and LongCat-Flash (Meituan LongCat Team 2025,
"LongCat-Flash Technical Report"). The gate [D, E + Z] scores the E FFN
experts plus Z = zero + copy + constant zero-computation choices
(`moe.zero_experts.zero`, `.copy`, `.constant`; what each outputs:
moejax/moe/zero_experts.py, which the MoE layer applies). probs = softmax
over the E + Z logits; each token picks k choices by the top-k of probs plus
the FFN experts' bias (below) and weights them by their unbiased
probabilities, divided by their sum over the k picks with `renormalize`
(default True). FFN picks are the `Assignment`'s valid slots (choice-major,
A = T * k); zero-computation picks are invalid slots and come back as
`zero_weights_TxZ`, so a token uses 0..k FFN experts and the layer's
`experts_per_token` metric is the measured mean number of FFN experts per
token.

Budget controller (`moe.zero_experts.target` K_e > 0; LongCat-Flash's
expert bias): a bias b [E] on the FFN experts' selection scores, not trained
("moe_state" "bias"), moved after every optimizer step from the step's pick
counts T_i over all E + Z choices, summed over the global batch:

  b_i += rate * (K_e / (k E) - T_i / sum_j T_j)   (FFN experts i; the
                                                  zero-computation choices
                                                  have no bias)

Summed over the FFN experts the step is rate * (K_e / k - their share of the
picks): the bias rises while the FFN experts get fewer than K_e of a token's
k picks on average and falls while they get more, and each FFN expert moves
towards the equal share K_e / (k E), so the bias also balances the FFN
experts. It changes only which choices are picked, never the weights or the
gradients. target = 0: no bias and no "moe_state" (a plain top-k over the
E + Z choices).

`probs_TxE` and `balance_counts_E` cover all E + Z choices, as for null
experts: the switch balancing loss spreads the picks uniformly over them
(an FFN share of E / (E + Z), i.e. k E / (E + Z) FFN experts per token);
choose Z so that this agrees with the target, or set moe.aux_loss_weight=0
and let the bias balance. Metrics: `zero_fraction`, `copy_fraction`,
`constant_fraction`, the share of the T * k picks that went to each kind.
Counting (moejax/model/counting.py): router params D * (E + Z); active
FLOPs count the nominal k routed choices (an upper bound of the FFN work;
the measured mean is the `experts_per_token` metric).

`zero_choice_route` is also the routing of `null_experts` (only zero experts,
no bias).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import fail, positive, positive_int, refuse_constant_gate
from moejax.moe.metrics import Metric
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment
from moejax.moe.zero_experts import KINDS, ZeroComputation


def zero_choice_route(logits_TxN: jax.Array, k: int, num_experts: int,
                      bias_E: jax.Array | None = None, renormalize: bool = True
                      ) -> tuple[Assignment, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Top-k over E experts + Z zero-computation choices (logits [T, E + Z]).

  Selection by probs (+ bias_E on the E experts, if given), weights the
  unbiased probs (renormalised over the k picks). Returns (assignment over the
  E experts, probs_TxN, zero-computation weights [T, Z], counts [E + Z] of all
  k picks, picks_TxK).
  """
  logits_TxN = logits_TxN.astype(jnp.float32)
  n = logits_TxN.shape[1]
  probs_TxN = jax.nn.softmax(logits_TxN, axis=-1)
  if bias_E is None:
    w_TxK, e_TxK = jax.lax.top_k(probs_TxN, k)
  else:
    bias_N = jnp.concatenate([bias_E.astype(jnp.float32),
                              jnp.zeros((n - num_experts,), jnp.float32)])
    _, e_TxK = jax.lax.top_k(jax.lax.stop_gradient(probs_TxN + bias_N), k)
    w_TxK = jnp.take_along_axis(probs_TxN, e_TxK, axis=-1)
  if renormalize:
    w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  real_TxK = e_TxK < num_experts
  assignment = Assignment.from_choices(jnp.minimum(e_TxK, num_experts - 1),
                                       jnp.where(real_TxK, w_TxK, 0.0), real_TxK)
  counts_N = jnp.sum(jax.nn.one_hot(e_TxK, n, dtype=jnp.float32), axis=(0, 1))
  # Index e - E of a zero-computation pick; FFN picks (negative) one-hot to nothing.
  onehot_TxKxZ = jax.nn.one_hot(e_TxK - num_experts, n - num_experts, dtype=jnp.float32)
  zero_TxZ = jnp.sum(onehot_TxKxZ * jnp.where(real_TxK, 0.0, w_TxK)[..., None], axis=1)
  return assignment, probs_TxN, zero_TxZ, counts_N, e_TxK


def update_ffn_bias(bias_E: jax.Array, counts_N: jax.Array, target: float, k: int,
                    rate: float) -> jax.Array:
  """b_i + rate * (target / (k E) - T_i / sum_j T_j) over the E FFN experts."""
  e = bias_E.shape[0]
  counts_N = counts_N.astype(jnp.float32)
  share_E = counts_N[:e] / jnp.maximum(jnp.sum(counts_N), 1.0)
  return bias_E + rate * (target / (k * e) - share_E)


def spec(cfg_moe) -> ZeroComputation:
  o = cfg_moe.zero_experts
  return ZeroComputation(zero=o.zero, copy=o.copy, constant=o.constant)


@register("zero_experts")
class ZeroExpertsRouter(Router):
  """Linear gate over E + Z choices + `zero_choice_route` with the budget bias."""

  adaptive = True

  @classmethod
  def zero_computation(cls, cfg_moe) -> ZeroComputation:
    return spec(cfg_moe)

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return tuple(Metric(f"{kind}_fraction", summary=True) for kind in KINDS)

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    return ("bias",) if cfg_moe.zero_experts.target > 0 else ()

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    o = cfg.moe.zero_experts
    for kind in KINDS:
      positive_int(cfg, f"moe.zero_experts.{kind}", allow_zero=True)
    positive(cfg, "moe.zero_experts.rate")
    positive(cfg, "moe.zero_experts.target", allow_zero=True)
    if not chosen:
      return
    z, k, e = spec(cfg.moe).total, cfg.moe.top_k, cfg.moe.num_experts
    if z == 0:
      fail("moe.zero_experts.zero", o.zero, "moe.zero_experts.zero + copy + constant must be "
           ">= 1 with moe.router='zero_experts' (else use moe.router='topk')")
    low = max(k - z, 0)
    if o.target and not low <= o.target <= k:
      why = (f" (with {z} zero-computation choices a token picks at least {low} FFN experts)"
             if low else "")
      fail("moe.zero_experts.target", o.target, f"allowed: 0 (no budget bias) or a mean "
           f"number of FFN experts per token in [{low}, moe.top_k={k}]{why}")
    refuse_constant_gate("moe.top_k", k, "moe.zero_experts.renormalize", o.renormalize, e + z,
                         "use moe.top_k >= 2 or moe.zero_experts.renormalize=False")

  @classmethod
  def param_count(cls, cfg_moe: ml_collections.ConfigDict, d_model: int) -> int:
    return d_model * (cfg_moe.num_experts + spec(cfg_moe).total)

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    o, e, k = self.cfg.zero_experts, self.cfg.num_experts, self.cfg.top_k
    z = spec(self.cfg)
    bias_E = None
    if o.target > 0:
      if self.has_variable("moe_state", "bias") or self.is_mutable_collection("moe_state"):
        bias_E = self.variable("moe_state", "bias", jnp.zeros, (e,), jnp.float32).value
      else:  # applied without its "moe_state" (a fresh model): the initial bias
        bias_E = jnp.zeros((e,), jnp.float32)
    logits_TxN = gate_logits(self, x_TxD, e + z.total)
    assignment, probs_TxN, zero_TxZ, counts_N, e_TxK = zero_choice_route(
        logits_TxN, k, e, bias_E, o.renormalize)
    metrics = {}
    picks = jnp.asarray(e_TxK.size, jnp.float32)
    for kind, cols in z.kind_slices().items():
      metrics[f"{kind}_fraction"] = jnp.sum(counts_N[e + cols.start:e + cols.stop]) / picks
    stats = {"counts": jax.lax.stop_gradient(counts_N)} if bias_E is not None else {}
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxN, probs_TxE=probs_TxN,
                        balance_counts_E=counts_N, metrics=metrics, state_stats=stats,
                        zero_weights_TxZ=zero_TxZ)

  @classmethod
  def update_state(cls, state: dict, stats: dict, cfg: ml_collections.FrozenConfigDict) -> dict:
    """One layer's new "bias" [E] from the step's global-batch pick counts [E + Z]."""
    o = cfg.zero_experts
    return {**state, "bias": update_ffn_bias(state["bias"], stats["counts"], o.target,
                                             cfg.top_k, o.rate)}
