"""Group-limited routing: experts in `num_groups` contiguous groups.

Scores are the softmax over all E experts (DeepSeek-V3 uses sigmoid scores;
softmax keeps the weights on the same scale as `topk` and the switch balance
loss meaningful). Expert e belongs to group e // (E / num_groups).

Options under `moe.group_limited`:
  num_groups: number of expert groups (must divide moe.num_experts).
  mode: "limited" (DeepSeek-V3 node-limited routing): a group's score is the
      sum of its top-2 expert probabilities (top-1 for groups of one
      expert); each token keeps its `top_groups` best groups and takes its
      top-k experts among them (the others are masked out).
      "balanced" (Mixture of Grouped Experts): every token takes exactly
      top_k / num_groups experts from every group (so num_groups must
      divide top_k), which balances load across groups (devices) by
      construction.
  top_groups: groups kept per token in "limited" mode
      (top_groups * E / num_groups >= top_k).
  renormalize: rescale each token's k weights to sum to 1; otherwise the
      weights are the selected softmax probabilities.
Slots are choice-major like `topk` (slot c*T + t is token t's c-th best
choice, by probability), A = T * k, all valid.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.checks import choice, fail, positive
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment

MODES = ("limited", "balanced")


def check_top_groups(cfg, prefix: str, num_groups: int, top_groups: int) -> None:
  """Group-limited routing keeps top_groups of num_groups, and at least top_k experts."""
  e, k = cfg.moe.num_experts, cfg.moe.top_k
  if top_groups > num_groups:
    fail(f"{prefix}.top_groups", top_groups, f"must be <= {prefix}.num_groups={num_groups}")
  if top_groups * (e // num_groups) < k:
    fail(f"{prefix}.top_groups", top_groups,
         f"must keep at least moe.top_k={k} experts: top_groups * moe.num_experts / "
         f"num_groups = {top_groups * (e // num_groups)}")


def group_mask(probs_TxE: jax.Array, num_groups: int, top_groups: int) -> jax.Array:
  """[T, E] bool: experts in each token's `top_groups` best groups.

  Group score = sum of the group's top-2 probabilities (top-1 if the group
  has one expert); ties go to the lower group index.
  """
  t, e = probs_TxE.shape
  size = e // num_groups
  top2_TxGx2, _ = jax.lax.top_k(probs_TxE.reshape(t, num_groups, size),
                                min(2, size))
  score_TxG = jnp.sum(top2_TxGx2, axis=-1)
  _, keep_TxK = jax.lax.top_k(score_TxG, top_groups)
  keep_TxG = jnp.any(keep_TxK[:, :, None] == jnp.arange(num_groups), axis=1)
  return jnp.repeat(keep_TxG, size, axis=1)


def group_limited_route(logits_TxE: jax.Array, k: int, num_groups: int,
                        mode: str = "limited", top_groups: int = 1,
                        renormalize: bool = True) -> tuple[Assignment, jax.Array]:
  """Pure group-limited routing math; returns (assignment, probs_TxE)."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  t, e = logits_TxE.shape
  if e % num_groups:
    raise ValueError(f"moe.group_limited.num_groups={num_groups} must divide "
                     f"moe.num_experts={e}")
  size = e // num_groups
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  if mode == "limited":
    # Masked experts get -1 (< any probability), so top-k never picks them
    # while top_groups * size >= k.
    masked_TxE = jnp.where(group_mask(probs_TxE, num_groups, top_groups),
                           probs_TxE, -1.0)
    _, e_TxK = jax.lax.top_k(masked_TxE, k)
  elif mode == "balanced":
    if k % num_groups:
      raise ValueError(f"moe.group_limited.num_groups={num_groups} must divide "
                       f"moe.top_k={k} in mode 'balanced'")
    per = k // num_groups
    _, local_TxGxP = jax.lax.top_k(probs_TxE.reshape(t, num_groups, size), per)
    base_G = jnp.arange(num_groups, dtype=jnp.int32) * size
    picks_TxK = (local_TxGxP + base_G[None, :, None]).reshape(t, k)
    # Order each token's picks by probability (ties: lower expert index).
    p_TxK = jnp.take_along_axis(probs_TxE, picks_TxK, axis=1)
    order_TxK = jnp.lexsort((picks_TxK, -p_TxK), axis=1)
    e_TxK = jnp.take_along_axis(picks_TxK, order_TxK, axis=1)
  else:
    raise ValueError(f"moe.group_limited.mode={mode!r}; allowed: {MODES}")
  w_TxK = jnp.take_along_axis(probs_TxE, e_TxK, axis=1)
  if renormalize:
    w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  assignment = Assignment.from_choices(e_TxK, w_TxK)
  return assignment, probs_TxE


@register("group_limited")
class GroupLimitedRouter(Router):
  """Linear gate + `group_limited_route`."""

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    gl = cfg.moe.group_limited
    for key in ("moe.group_limited.num_groups", "moe.group_limited.top_groups"):
      positive(cfg, key)
    choice(gl.mode, "moe.group_limited.mode", MODES)
    if not chosen:
      return
    e, k = cfg.moe.num_experts, cfg.moe.top_k
    if e % gl.num_groups:
      fail("moe.group_limited.num_groups", gl.num_groups, f"must divide moe.num_experts={e}")
    if gl.mode == "balanced" and k % gl.num_groups:
      fail("moe.group_limited.num_groups", gl.num_groups,
           f"must divide moe.top_k={k} with moe.group_limited.mode='balanced'")
    if gl.mode == "limited":
      check_top_groups(cfg, "moe.group_limited", gl.num_groups, gl.top_groups)

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    opts = self.cfg.group_limited
    logits_TxE = gate_logits(self, x_TxD, self.cfg.num_experts)
    assignment, probs_TxE = group_limited_route(
        logits_TxE, self.cfg.top_k, opts.num_groups, opts.mode, opts.top_groups,
        opts.renormalize)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE,
                        probs_TxE=probs_TxE)
