"""Token-choice top-k router (Switch / GShard / Mixtral).

Options under `moe.topk`:
  order: "softmax_topk" (softmax over all experts, then top-k; Switch/GShard)
         or "topk_softmax" (top-k on logits, softmax over the k; Mixtral).
  renormalize: with softmax_topk, rescale the k weights to sum to 1.
  jitter: multiplicative input jitter eps (x * U[1-eps, 1+eps]) in training.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import fan_in_init
from moejax.moe.routers import register
from moejax.moe.routers.base import RouterOutput
from moejax.moe.types import Assignment

ORDERS = ("softmax_topk", "topk_softmax")


def topk_route(logits_TxE: jax.Array, k: int, order: str = "softmax_topk",
               renormalize: bool = False) -> tuple[Assignment, jax.Array]:
  """Pure top-k routing math; returns (assignment, probs_TxE).

  Slots are choice-major: slot c*T + t is token t's c-th choice, so slot
  order is the priority order capacity-based dispatch drops by (all first
  choices before any second choice, as in GShard).
  """
  logits_TxE = logits_TxE.astype(jnp.float32)
  t = logits_TxE.shape[0]
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
  assignment = Assignment(
      token=jnp.tile(jnp.arange(t, dtype=jnp.int32), k),
      expert=e_TxK.T.reshape(-1).astype(jnp.int32),
      weight=w_TxK.T.reshape(-1),
      valid=jnp.ones((t * k,), bool),
  )
  return assignment, probs_TxE


@register("topk")
class TopKRouter(nn.Module):
  """Linear gate + `topk_route`."""

  cfg: ml_collections.FrozenConfigDict  # the `moe` config

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None,
               deterministic: bool = True) -> RouterOutput:
    del shape_BxL, token_ids
    opts = self.cfg.topk
    d = x_TxD.shape[-1]
    x = x_TxD.astype(jnp.float32)
    if opts.jitter > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("router"), x.shape,
                                 minval=1.0 - opts.jitter,
                                 maxval=1.0 + opts.jitter)
    w_DxE = self.param("w_gate", fan_in_init(d), (d, self.cfg.num_experts))
    logits_TxE = jnp.dot(x, w_DxE, precision="highest")
    assignment, probs_TxE = topk_route(logits_TxE, self.cfg.top_k, opts.order,
                                       opts.renormalize)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE,
                        probs_TxE=probs_TxE)
