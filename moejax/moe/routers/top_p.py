"""Top-p dynamic routing (Huang et al. 2024, "Harder tasks need more experts").

Each token takes the fewest experts, by descending softmax probability, whose
probabilities sum to at least `moe.top_p.p`: at least 1 and at most
`moe.top_p.max_k` (tokens whose top-p set is cut by max_k count as overflow).
Slots: A = T * max_k, choice-major (slot c*T + t is token t's c-th choice),
`valid` marking the live ones.

Options under `moe.top_p`:
  p: probability mass threshold in (0, 1].
  max_k: buffer size per token (<= moe.num_experts).
  renormalize: default False, as in the paper: the weights are the selected
      probabilities themselves, so a confident token (one expert with
      prob >= p) is not scaled up to 1 and the weights stay differentiable
      through the softmax. True rescales each token's live weights to sum 1.
  entropy_weight: weight of the paper's dynamic loss "entropy_loss", the mean
      entropy of the router distribution, which keeps distributions sharp
      (few experts).
Metric `overflow_fraction`: share of tokens whose top-p set was cut by max_k.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import fail, positive
from moejax.moe.metrics import Metric, mean_entropy
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment


def top_p_route(logits_TxE: jax.Array, p: float, max_k: int,
                renormalize: bool = False
                ) -> tuple[Assignment, jax.Array, jax.Array]:
  """Pure top-p routing math; returns (assignment, probs_TxE, overflow_T bool)."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  w_TxK, e_TxK = jax.lax.top_k(probs_TxE, max_k)
  csum_TxK = jnp.cumsum(w_TxK, axis=-1)
  # Choice c is live iff the mass of the choices before it is still < p.
  live_TxK = (csum_TxK - w_TxK) < p
  live_TxK = live_TxK.at[:, 0].set(True)
  # Cut iff the max_k choices hold less than p (impossible when max_k = E).
  overflow_T = (csum_TxK[:, -1] < p) & (max_k < logits_TxE.shape[-1])
  w_TxK = jnp.where(live_TxK, w_TxK, 0.0)
  if renormalize:
    w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  assignment = Assignment.from_choices(e_TxK, w_TxK, live_TxK)
  return assignment, probs_TxE, overflow_T


@register("top_p")
class TopPRouter(Router):
  """Linear gate + `top_p_route` (+ the entropy penalty)."""

  adaptive = True

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return (Metric("overflow_fraction", summary=True),)

  @classmethod
  def aux_losses(cls, cfg_moe) -> tuple[AuxLoss, ...]:
    return (AuxLoss("entropy_loss", "moe.top_p.entropy_weight"),)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    opts = cfg.moe.top_p
    positive(cfg, "moe.top_p.entropy_weight", allow_zero=True)
    positive(cfg, "moe.top_p.max_k")
    if not 0 < opts.p <= 1:
      fail("moe.top_p.p", opts.p, "must be in (0, 1]")
    if chosen and opts.max_k > cfg.moe.num_experts:
      fail("moe.top_p.max_k", opts.max_k, f"must be <= moe.num_experts={cfg.moe.num_experts}")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    opts = self.cfg.top_p
    logits_TxE = gate_logits(self, x_TxD, self.cfg.num_experts)
    assignment, probs_TxE, overflow_T = top_p_route(
        logits_TxE, opts.p, opts.max_k, opts.renormalize)
    return RouterOutput(
        assignment=assignment, logits_TxE=logits_TxE, probs_TxE=probs_TxE,
        losses={"entropy_loss": mean_entropy(probs_TxE)},
        metrics={"overflow_fraction": jnp.mean(overflow_T.astype(jnp.float32))})
