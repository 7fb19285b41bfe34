"""Hash routing (Roller et al. 2021): a fixed random function of the token id.

The classic non-learned baseline: no parameters, no router scores
(`logits_TxE` / `probs_TxE` are None, so the layer reports no balance or
z-loss). It needs the token ids (the MoE layer passes the model's input ids)
and raises if they are missing.

With top_k = k, the token's k experts come from k independent hash functions
of its id, drawn without replacement: choice j hashes to an index among the
E - j experts not yet chosen, so the k experts are always distinct (k <= E).
Every slot is valid, weight 1/k. Slots are choice-major (slot j*T + t).

The hash is the 32-bit "lowbias32" integer mixer (multiply-xorshift) of
id + (seed * k + j + 1) * golden-ratio constant, with `moe.hash.seed`; it is
deterministic and uniform enough for balance (the vocabulary, not the mixer,
decides the load: frequent tokens overload their experts). The seed does not
depend on the layer, so every MoE layer routes a token id identically.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import fail, positive
from moejax.moe import chain
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput
from moejax.moe.types import Assignment

_GOLDEN = 0x9E3779B9


def mix32(x_T: jax.Array) -> jax.Array:
  """lowbias32 integer hash (Chris Wellons), uint32 -> uint32, bijective."""
  x = x_T.astype(jnp.uint32)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_experts(ids_T: jax.Array, num_experts: int, k: int, seed: int) -> jax.Array:
  """[T, k] int32 distinct experts per token id, a fixed function of (id, seed)."""
  ids = ids_T.astype(jnp.uint32)
  taken_TxE = jnp.zeros((ids.shape[0], num_experts), bool)
  picks = []
  for j in range(k):
    salt = jnp.uint32(((seed * k + j + 1) * _GOLDEN) % 2**32)
    r_T = (mix32(ids + salt) % jnp.uint32(num_experts - j)).astype(jnp.int32)
    # The r-th expert (0-based) among those not taken yet.
    rank_TxE = jnp.cumsum(~taken_TxE, axis=1) - 1
    pick_TxE = ~taken_TxE & (rank_TxE == r_T[:, None])
    picks.append(jnp.argmax(pick_TxE, axis=1).astype(jnp.int32))
    taken_TxE = taken_TxE | pick_TxE
  return jnp.stack(picks, axis=1)


def hash_route(ids_T: jax.Array, num_experts: int, k: int, seed: int) -> Assignment:
  """Pure hash routing: k distinct hashed experts per token, weight 1/k."""
  e_TxK = hash_experts(ids_T, num_experts, k, seed)
  return Assignment.from_choices(e_TxK, jnp.full(e_TxK.shape, 1.0 / k, jnp.float32))


@register("hash")
class HashRouter(Router):
  """`hash_route` on the token ids; holds no parameters."""

  returns_probs = False

  @classmethod
  def expert_embedding(cls, cfg_moe):
    del cfg_moe
    return None  # no gate: nothing represents an expert in the token space

  @classmethod
  def param_count(cls, cfg_moe: ml_collections.ConfigDict, d_model: int) -> int:
    return 0

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    positive(cfg, "moe.hash.seed", allow_zero=True)
    if chosen and chain.rounds(cfg.moe) > 1:
      fail("moe.chain.rounds", chain.rounds(cfg.moe), "must be 1 with moe.router='hash': "
           "Chain-of-Experts re-routes each round's output, and a hash of the token id "
           "picks the same experts in every round")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del deterministic, carry, shared
    if token_ids is None:
      raise ValueError("moe.router='hash' routes by token id: the MoE layer "
                       "must be called with token_ids_BxL")
    t = x_TxD.shape[0]
    if token_ids.shape != (t,):
      raise ValueError(f"hash router: token_ids shape {token_ids.shape} != ({t},) "
                       f"for shape_BxL={shape_BxL}")
    assignment = hash_route(token_ids, self.cfg.num_experts, self.cfg.top_k,
                            self.cfg.hash.seed)
    return RouterOutput(assignment=assignment, logits_TxE=None, probs_TxE=None)
