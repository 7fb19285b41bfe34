"""THOR: stochastic experts (Zuo et al. 2022, "Taming Sparsely Activated Transformer
with Stochastic Experts").

No learned router. In training (deterministic=False) each token goes to
moe.top_k distinct experts drawn uniformly at random (a fresh draw per
token and per MoE layer from the "router" rng stream; the layer scan splits
it per layer), each with weight 1/k. The paper uses k = 1.

The router declares a `Consistency` (moejax/moe/routers/base.py): the
trainer runs every batch through the model twice with independent "router"
rngs, so each token gets two independent random expert choices, and trains on

    (CE_1 + CE_2) / 2 + consistency_weight * (KL(p_1 || p_2) + KL(p_2 || p_1)) / 2

per token, p_1 and p_2 the two passes' next-token distributions: the
paper's CE_1 + CE_2 + alpha * CR(p_1, p_2) halved, with alpha = 2 *
consistency_weight (`train/consistency_loss` logs the symmetric KL). With
distillation, each pass's CE becomes its distillation loss.

Inference (deterministic=True), option `moe.thor.inference`:
  average: every expert with weight 1/E, the expectation of the layer over
      the random choice of one expert (E expert applications per token;
      slot e * T + t is token t's expert e);
  single: one expert per token, weight 1, a fixed hash of the token id
      (`hash_experts` with `moe.thor.seed`, the hash router's function), so
      each token id always meets the same expert (1 expert application).
Both route a token alone exactly as inside its batch, so both can decode.

Options under `moe.thor`: inference, consistency_weight (>= 0), seed.
No parameters and no router probabilities (like the hash router): the MoE
layer reports no balancing or z-loss for it, and the router-entropy and ERC
losses are refused. Counting (moejax/model/counting.py): top_k experts per
token in training, E ("average") or 1 ("single") at inference; a training
step runs two passes, which flops_per_token counts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.checks import choice, fail, is_int, positive
from moejax.moe.routers import register
from moejax.moe.routers.base import Consistency, Router, RouterOutput
from moejax.moe.routers.hash import hash_route
from moejax.moe.types import Assignment

INFERENCES = ("average", "single")
CONSISTENCY = Consistency("moe.thor.consistency_weight")


def random_experts(key: jax.Array, num_tokens: int, num_experts: int, k: int) -> jax.Array:
  """[T, k] int32: k distinct experts per token, uniformly at random (every k-subset and
  order equally likely: the top k of E independent uniforms)."""
  u_TxE = jax.random.uniform(key, (num_tokens, num_experts), jnp.float32)
  _, e_TxK = jax.lax.top_k(u_TxE, k)
  return e_TxK.astype(jnp.int32)


def stochastic_route(key: jax.Array, num_tokens: int, num_experts: int, k: int) -> Assignment:
  """Training routing: `random_experts`, weight 1/k, choice-major slots (c * T + t)."""
  e_TxK = random_experts(key, num_tokens, num_experts, k)
  return Assignment.from_choices(e_TxK, jnp.full(e_TxK.shape, 1.0 / k, jnp.float32))


def average_route(num_tokens: int, num_experts: int) -> Assignment:
  """Every token through every expert with weight 1/E (slot e * T + t: token t, expert e)."""
  e_TxE = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts))
  return Assignment.from_choices(e_TxE, jnp.full(e_TxE.shape, 1.0 / num_experts, jnp.float32))


@register("thor")
class ThorRouter(Router):
  """Uniformly random experts in training; their average or a hashed one at inference."""

  returns_probs = False

  @classmethod
  def consistency(cls, cfg_moe) -> Consistency:
    del cfg_moe
    return CONSISTENCY

  @classmethod
  def expert_embedding(cls, cfg_moe):
    del cfg_moe
    return None  # no router parameters

  @classmethod
  def param_count(cls, cfg_moe, d_model: int) -> int:
    del cfg_moe, d_model
    return 0

  @classmethod
  def inference_experts_per_token(cls, cfg) -> float:
    return cfg.moe.num_experts if cfg.moe.thor.inference == "average" else 1

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    del chosen
    opts = cfg.moe.thor
    choice(opts.inference, "moe.thor.inference", INFERENCES)
    positive(cfg, "moe.thor.consistency_weight", allow_zero=True)
    if not is_int(opts.seed) or opts.seed < 0:
      fail("moe.thor.seed", opts.seed, "must be a non-negative integer")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del carry, shared
    t, e, opts = x_TxD.shape[0], self.cfg.num_experts, self.cfg.thor
    if not deterministic:
      assignment = stochastic_route(self.make_rng("router"), t, e, self.cfg.top_k)
    elif opts.inference == "average":
      assignment = average_route(t, e)
    else:
      if token_ids is None or token_ids.shape != (t,):
        raise ValueError(f"moe.thor.inference='single' routes by token id: the MoE layer "
                         f"must pass token ids of shape ({t},) for shape_BxL={shape_BxL}")
      assignment = hash_route(token_ids, e, 1, opts.seed)
    return RouterOutput(assignment=assignment, logits_TxE=None, probs_TxE=None)
