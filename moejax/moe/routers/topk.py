"""Token-choice top-k router (Switch / GShard / Mixtral), optionally noisy.

Options under `moe.topk`:
  order: "softmax_topk" (softmax over all experts, then top-k; Switch/GShard)
         or "topk_softmax" (top-k on logits, softmax over the k; Mixtral).
  renormalize: with softmax_topk, rescale the k weights to sum to 1.
  jitter: multiplicative input jitter eps (x * U[1-eps, 1+eps]) in training.
  noise: "none" or "gaussian": Shazeer et al. (2017) noisy top-k gating. In
         training the logits get softplus(x @ w_noise) + 1e-2 times N(0, 1)
         noise (rng stream "router"; `w_noise` is learned and starts at zero,
         as in the paper); evaluation uses the clean logits.
  copies: experts come in groups of `copies` consecutive duplicates (grown
         experts); a token uses at most one expert per group (`group_route`).
  grown_groups: > 0: the experts are duplicates of this many original
         experts, groups of any size, each layer's membership in the
         "moe_state" variable "group" (init.grow_select='importance').
  importance_weight, load_weight: with noise on, the router reports the
         paper's two balancing losses, weighted by these keys:
         "importance_loss" = CV^2 of the per-expert sums of the gates (the
         combine weights) and "load_loss" = CV^2 of the per-expert sums of
         the smooth probability (normal CDF) that the expert is in a
         token's top-k under a fresh draw of the noise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import choice, fail, is_int, positive, refuse_constant_gate
from moejax.layers import fan_in_init
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput
from moejax.moe.types import Assignment

ORDERS = ("softmax_topk", "topk_softmax")
NOISES = ("none", "gaussian")
NOISE_EPS = 1e-2  # floor of the noise std (Shazeer et al.'s noise_epsilon)


def topk_route(logits_TxE: jax.Array, k: int, order: str = "softmax_topk",
               renormalize: bool = False) -> tuple[Assignment, jax.Array]:
  """Pure top-k routing math; returns (assignment, probs_TxE).

  Slots are choice-major: slot c*T + t is token t's c-th choice, so slot
  order is the priority order capacity-based dispatch drops by (all first
  choices before any second choice, as in GShard).
  """
  logits_TxE = logits_TxE.astype(jnp.float32)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  if order == "softmax_topk":
    w_TxK, e_TxK = jax.lax.top_k(probs_TxE, k)
    if renormalize:
      w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  elif order == "topk_softmax":
    l_TxK, e_TxK = jax.lax.top_k(logits_TxE, k)
    w_TxK = jax.nn.softmax(l_TxK, axis=-1)
  else:
    raise ValueError(f"moe.topk.order={order!r}; allowed: {ORDERS}")
  assignment = Assignment.from_choices(e_TxK, w_TxK)
  return assignment, probs_TxE


def copy_groups(num_experts: int, copies: int) -> jax.Array:
  """Group id of each expert when every group is `copies` consecutive experts."""
  return jnp.arange(num_experts, dtype=jnp.int32) // copies


def default_groups(num_experts: int, num_groups: int) -> jax.Array:
  """Contiguous, near-equal groups: the initial value of the "group" state."""
  return (jnp.arange(num_experts, dtype=jnp.int32) * num_groups) // num_experts


def group_route(logits_TxE: jax.Array, k: int, group_E: jax.Array, num_groups: int,
                order: str = "softmax_topk", renormalize: bool = False
                ) -> tuple[Assignment, jax.Array]:
  """Top-k over groups of duplicated experts, at most one expert per group.

  For experts grown by duplication (moejax/init/grow.py): expert e belongs to
  group `group_E[e]` (every group non-empty; groups may differ in size). A
  group's logit is the log-mean-exp of its experts' logits, `topk_route`
  picks k groups with their weights, and each picked group sends the token
  to its highest-logit expert (ties: the lowest index). Tied copies of an
  expert give a group logit equal to the original logit whatever the group
  sizes, so routing and output equal the model before growing. Returns
  (assignment, probs over all experts).
  """
  t, e = logits_TxE.shape
  l_ExT = logits_TxE.astype(jnp.float32).T
  group_E = group_E.astype(jnp.int32)
  seg = dict(segment_ids=group_E, num_segments=num_groups)
  m_GxT = jax.lax.stop_gradient(jax.ops.segment_max(l_ExT, **seg))  # lse is m-invariant
  s_GxT = jax.ops.segment_sum(jnp.exp(l_ExT - m_GxT[group_E]), **seg)
  n_G = jax.ops.segment_sum(jnp.ones((e,), jnp.float32), **seg)
  group_TxG = (m_GxT + jnp.log(s_GxT) - jnp.log(n_G)[:, None]).T
  assignment, _ = topk_route(group_TxG, k, order, renormalize)
  is_max_ExT = l_ExT == m_GxT[group_E]
  idx_ExT = jnp.where(is_max_ExT, jnp.arange(e, dtype=jnp.int32)[:, None], e)
  best_GxT = jax.ops.segment_min(idx_ExT, **seg)
  expert = best_GxT[assignment.expert, assignment.token]
  return assignment.replace(expert=expert), jax.nn.softmax(
      logits_TxE.astype(jnp.float32), axis=-1)


def cv_squared(x_E: jax.Array) -> jax.Array:
  """Squared coefficient of variation var/(mean^2 + 1e-10); 0 for one expert."""
  x_E = x_E.astype(jnp.float32)
  if x_E.shape[0] <= 1:
    return jnp.zeros((), jnp.float32)
  return jnp.var(x_E) / (jnp.mean(x_E) ** 2 + 1e-10)


def load_probs(clean_TxE: jax.Array, noisy_TxE: jax.Array, std_TxE: jax.Array,
               k: int) -> jax.Array:
  """P[t, i]: smooth probability that expert i is in token t's noisy top-k.

  Shazeer et al. (2017): Phi((clean_i - thr_i) / std_i) with thr_i the k-th
  largest noisy logit among the *other* experts, i.e. the (k+1)-th largest
  noisy logit if i is in the noisy top-k and the k-th largest otherwise.
  With k = E every expert is always selected (P = 1).
  """
  if k >= clean_TxE.shape[-1]:
    return jnp.ones(clean_TxE.shape, jnp.float32)
  top_TxK1, _ = jax.lax.top_k(noisy_TxE, k + 1)
  thr_in_Tx1, thr_out_Tx1 = top_TxK1[:, k:k + 1], top_TxK1[:, k - 1:k]
  is_in_TxE = noisy_TxE > thr_in_Tx1
  p_in = jax.scipy.stats.norm.cdf((clean_TxE - thr_in_Tx1) / std_TxE)
  p_out = jax.scipy.stats.norm.cdf((clean_TxE - thr_out_Tx1) / std_TxE)
  return jnp.where(is_in_TxE, p_in, p_out)


def importance_load_losses(assignment: Assignment, clean_TxE: jax.Array,
                           noisy_TxE: jax.Array, std_TxE: jax.Array, k: int
                           ) -> tuple[jax.Array, jax.Array]:
  """Unweighted (importance, load) losses: CV^2 of per-expert gate sums and loads."""
  t, e = clean_TxE.shape
  importance_E = jnp.sum(assignment.combine_matrix(t, e), axis=0)
  load_E = jnp.sum(load_probs(clean_TxE, noisy_TxE, std_TxE, k), axis=0)
  return cv_squared(importance_E), cv_squared(load_E)


@register("topk")
class TopKRouter(Router):
  """Linear gate (+ optional learned Gaussian noise) + `topk_route`.

  With noise on, `logits_TxE` / `probs_TxE` are the noisy ones that routed
  (so the switch balance and z-loss see what the top-k saw).
  """

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    return ("group",) if cfg_moe.topk.get("grown_groups", 0) > 0 else ()

  @classmethod
  def aux_losses(cls, cfg_moe) -> tuple[AuxLoss, ...]:
    if cfg_moe.topk.noise != "gaussian":
      return ()
    return (AuxLoss("importance_loss", "moe.topk.importance_weight"),
            AuxLoss("load_loss", "moe.topk.load_weight"))

  @classmethod
  def param_count(cls, cfg_moe, d_model: int) -> int:
    return d_model * cfg_moe.num_experts * (2 if cfg_moe.topk.noise == "gaussian" else 1)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    moe, opts = cfg.moe, cfg.moe.topk
    choice(opts.order, "moe.topk.order", ORDERS)
    choice(opts.noise, "moe.topk.noise", NOISES)
    for key in ("moe.topk.jitter", "moe.topk.importance_weight", "moe.topk.load_weight"):
      positive(cfg, key, allow_zero=True)
    copies, groups = opts.get("copies", 1), opts.get("grown_groups", 0)
    if not is_int(copies) or copies < 1:
      fail("moe.topk.copies", copies, "must be a positive integer")
    if not is_int(groups) or groups < 0:
      fail("moe.topk.grown_groups", groups, "must be a non-negative integer")
    e, k = moe.num_experts, moe.top_k
    if copies > 1:
      if not chosen or opts.noise != "none":
        fail("moe.topk.copies", copies, "> 1 needs moe.router='topk' with moe.topk.noise='none'")
      if e % copies or k > e // copies:
        fail("moe.topk.copies", copies, f"must divide moe.num_experts={e} "
             f"into at least moe.top_k={k} groups")
    if groups > 0:
      if not chosen or opts.noise != "none" or copies > 1:
        fail("moe.topk.grown_groups", groups, "> 0 needs moe.router='topk' with "
             "moe.topk.noise='none' and moe.topk.copies=1")
      if not k <= groups <= e:
        fail("moe.topk.grown_groups", groups, f"must be between moe.top_k={k} and "
             f"moe.num_experts={e}")
    if not chosen:
      return
    if opts.order == "topk_softmax":
      refuse_constant_gate("moe.top_k", k, "moe.topk.order", "topk_softmax", e,
                           "use moe.topk.order='softmax_topk' with moe.topk.renormalize=False "
                           "(Switch)")
    else:
      refuse_constant_gate("moe.top_k", k, "moe.topk.renormalize", opts.renormalize, e,
                           "use moe.topk.renormalize=False (Switch)")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, carry, shared
    opts = self.cfg.topk
    noise = opts.noise
    d, e, k = x_TxD.shape[-1], self.cfg.num_experts, self.cfg.top_k
    x = x_TxD.astype(jnp.float32)
    if opts.jitter > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("router"), x.shape,
                                 minval=1.0 - opts.jitter,
                                 maxval=1.0 + opts.jitter)
    w_DxE = self.param("w_gate", fan_in_init(d), (d, e))
    logits_TxE = jnp.dot(x, w_DxE, precision="highest")
    losses = {}
    if noise == "gaussian":
      w_noise_DxE = self.param("w_noise", nn.initializers.zeros, (d, e))
      std_TxE = jax.nn.softplus(
          jnp.dot(x, w_noise_DxE, precision="highest")) + NOISE_EPS
      clean_TxE = logits_TxE
      if not deterministic:
        logits_TxE = clean_TxE + std_TxE * jax.random.normal(
            self.make_rng("router"), clean_TxE.shape, jnp.float32)
    copies, groups = opts.get("copies", 1), opts.get("grown_groups", 0)  # moejax/init/grow.py
    if groups > 0:
      group_E = self.variable("moe_state", "group", default_groups, e, groups).value
      assignment, probs_TxE = group_route(logits_TxE, k, group_E, groups, opts.order,
                                          opts.renormalize)
    elif copies > 1:
      assignment, probs_TxE = group_route(logits_TxE, k, copy_groups(e, copies), e // copies,
                                          opts.order, opts.renormalize)
    else:
      assignment, probs_TxE = topk_route(logits_TxE, k, opts.order,
                                         opts.renormalize)
    if noise == "gaussian":
      imp, load = importance_load_losses(assignment, clean_TxE, logits_TxE,
                                         std_TxE, k)
      losses = {"importance_loss": imp, "load_loss": load}
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE,
                        probs_TxE=probs_TxE, losses=losses)
