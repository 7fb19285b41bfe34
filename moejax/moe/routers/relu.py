"""ReLU router (ReMoE, Wang et al. 2024): a variable number of experts per token.

gates = relu(logits); a token uses every expert whose gate is positive, with
the gate itself as output weight (ReMoE uses no softmax and no
renormalisation, and we add no RMSNorm on the output). Sparsity is
controlled by ReMoE's load-balanced L1 penalty

  L_reg = sum_e f_e * mean_t gate_te,   f_e = E / (k T) * #{t: gate_te > 0}

(f_e held constant, as its indicator has no gradient), times a coefficient
lambda adapted every step: lambda *= alpha^sign(active - k/E), with
`active` the fraction of positive (token, expert) pairs, so it drives that
fraction to k/E. lambda ("moe_state" "l1_coef") is updated after the
optimizer step from the active-pair counts of the global batch summed over
all MoE layers (ReMoE's single coefficient for the model-average sparsity;
every layer's copy gets the same update). The loss `relu_l1` is reported
already multiplied by lambda (declared with weight 1: its scale is the
adaptive lambda, not a config key) and is summed over layers.

Static shapes: the assignment has A = T * max_k slots; a token keeps its
max_k largest positive gates, the rest are dropped and reported as
`overflow_fraction` (share of positive gates dropped). `probs_TxE` =
softmax(logits) under stop-gradient (a token may have no positive gate), so
the switch balance loss and entropy / top-1 metrics only report; logits_TxE
is None (a z-loss would fight the L1 control).

Options under `moe.relu`: max_k, l1_init (lambda_0), alpha.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.aux_losses import AuxLoss
from moejax.checks import fail, positive
from moejax.moe.metrics import Metric
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment


def relu_route(logits_TxE: jax.Array, max_k: int
               ) -> tuple[Assignment, jax.Array, jax.Array]:
  """Pure routing math; returns (assignment, gates_TxE, overflow_fraction).

  Slots are choice-major (slot c*T + t is token t's c-th largest gate);
  a slot is valid iff its gate is positive.
  """
  gates_TxE = jax.nn.relu(logits_TxE.astype(jnp.float32))
  g_TxK, e_TxK = jax.lax.top_k(gates_TxE, max_k)
  valid_TxK = g_TxK > 0
  positive = jnp.sum(gates_TxE > 0)
  overflow = (positive - jnp.sum(valid_TxK)) / jnp.maximum(positive, 1)
  assignment = Assignment.from_choices(e_TxK, g_TxK, valid_TxK)
  return assignment, gates_TxE, overflow.astype(jnp.float32)


def load_balanced_l1(gates_TxE: jax.Array, k: int) -> jax.Array:
  """ReMoE's L_reg = sum_e f_e * mean_t gate_te, f_e = E/(kT) * #active (constant)."""
  t, e = gates_TxE.shape
  f_E = jax.lax.stop_gradient(e / (k * t) * jnp.sum(gates_TxE > 0, axis=0))
  return jnp.sum(f_E * jnp.mean(gates_TxE, axis=0))


def update_l1_coef(coef: jax.Array, active: jax.Array, pairs: jax.Array,
                   target: float, alpha: float) -> jax.Array:
  """lambda * alpha^sign(active fraction - target)."""
  frac = active / jnp.maximum(pairs, 1.0)
  return coef * jnp.power(alpha, jnp.sign(frac - target))


@register("relu")
class ReLURouter(Router):
  """Linear gate + `relu_route` + the adaptive load-balanced L1 penalty."""

  adaptive = True
  # moejax.moe.state sums the stats over MoE layers before `update_state`.
  pool_stats_over_layers = True

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    return ("l1_coef",)

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return (Metric("l1_coef"), Metric("overflow_fraction", summary=True))

  @classmethod
  def aux_losses(cls, cfg_moe) -> tuple[AuxLoss, ...]:
    return (AuxLoss("relu_l1", None),)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    opts = cfg.moe.relu
    for key in ("moe.relu.max_k", "moe.relu.l1_init"):
      positive(cfg, key)
    if opts.alpha <= 1:
      fail("moe.relu.alpha", opts.alpha, "must be > 1 (lambda is multiplied or divided by it)")
    e, k = cfg.moe.num_experts, cfg.moe.top_k
    if chosen and not k <= opts.max_k <= e:
      fail("moe.relu.max_k", opts.max_k, f"must be in [moe.top_k={k}, moe.num_experts={e}]")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    opts = self.cfg.relu
    e = self.cfg.num_experts
    coef = jnp.full((), opts.l1_init, jnp.float32)
    if self.has_variable("moe_state", "l1_coef") or self.is_mutable_collection("moe_state"):
      coef = self.variable("moe_state", "l1_coef", lambda: coef).value
    logits_TxE = gate_logits(self, x_TxD, e)
    assignment, gates_TxE, overflow = relu_route(logits_TxE, min(opts.max_k, e))
    l1 = jax.lax.stop_gradient(coef) * load_balanced_l1(gates_TxE, self.cfg.top_k)
    probs_TxE = jax.lax.stop_gradient(jax.nn.softmax(logits_TxE, axis=-1))
    active = jax.lax.stop_gradient(jnp.sum(gates_TxE > 0).astype(jnp.float32))
    pairs = jnp.asarray(gates_TxE.size, jnp.float32)
    return RouterOutput(assignment=assignment, logits_TxE=None, probs_TxE=probs_TxE,
                        losses={"relu_l1": l1},
                        metrics={"l1_coef": coef, "overflow_fraction": overflow},
                        state_stats={"active": active, "pairs": pairs})

  @classmethod
  def update_state(cls, state: dict, stats: dict, cfg: ml_collections.FrozenConfigDict) -> dict:
    """New "l1_coef" from the step's active / total (token, expert) pair counts.

    The coefficient never falls below `moe.relu.l1_init`: a model that trains
    sparser than the target on its own would otherwise drive it towards 0
    (1e-27 was seen), from where it takes very long to recover.
    """
    target = cfg.top_k / cfg.num_experts
    coef = update_l1_coef(state["l1_coef"], stats["active"], stats["pairs"], target,
                          cfg.relu.alpha)
    return {**state, "l1_coef": jnp.maximum(coef, cfg.relu.l1_init)}
