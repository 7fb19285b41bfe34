"""Expert-choice routing (Zhou et al. 2022): experts pick tokens.

Within each group of S competing tokens, every expert takes its top-C tokens
by router score, C = min(S, max(1, ceil(capacity_factor * S * top_k / E)))
(`moe.capacity_factor`, `moe.top_k`); the slot weight is the softmax-over-
experts probability of the chosen (token, expert). Every expert receives
exactly C tokens per group, so load is balanced by construction; a token may
get zero, one or several experts. Slots: A = num_groups * E * C, all valid,
rank-major (slot (c * G + g) * E + e is expert e's c-th pick in group g), so
capacity dispatch would drop lower-ranked picks first.

Option `moe.expert_choice.group`:
  "position" (default): the B tokens at the same sequence position compete
      (the Mixture-of-Tokens trick), never tokens along the sequence, so a
      decoder stays causal. C is computed from S = B. With batch size 1
      (e.g. sampling or per-sequence evaluation) a group holds one token and
      C = 1, so every expert takes every token: the layer degenerates to a
      dense mixture of all experts weighted by the softmax, which differs
      from what the model saw in training with B > 1. Evaluate with the
      training batch size (and a batch of comparable sequences) to measure
      what was trained.
  "batch": all T = B * L tokens of the batch compete (the original paper's
      encoder setting). NOT causal: a token's experts depend on later tokens
      of its own and other sequences, so a decoder trained this way sees the
      future through routing; its loss is not a valid LM loss and it cannot
      generate token by token. With batch size 1 the sequence alone competes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import choice
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment

GROUPS = ("position", "batch")


def expert_choice_capacity(group_size: int, num_experts: int, top_k: int,
                           capacity_factor: float) -> int:
  """Tokens per expert per group: ceil(cf * S * k / E), clipped to [1, S]."""
  c = math.ceil(capacity_factor * group_size * top_k / num_experts)
  return min(group_size, max(1, c))


def group_layout(shape_BxL: tuple[int, int], group: str) -> tuple[int, int]:
  """(num_groups G, group_size S) for tokens flattened batch-major."""
  b, l = shape_BxL
  if group == "position":
    return l, b
  if group == "batch":
    return 1, b * l
  raise ValueError(f"moe.expert_choice.group={group!r}; allowed: {GROUPS}")


def expert_choice_route(logits_TxE: jax.Array, shape_BxL: tuple[int, int],
                        top_k: int, capacity_factor: float,
                        group: str = "position") -> tuple[Assignment, jax.Array]:
  """Pure expert-choice routing math; returns (assignment, probs_TxE).

  Ties between tokens go to the lower token index within the group.
  """
  b, l = shape_BxL
  logits_TxE = logits_TxE.astype(jnp.float32)
  e = logits_TxE.shape[-1]
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  g, s = group_layout(shape_BxL, group)
  c = expert_choice_capacity(s, e, top_k, capacity_factor)
  if group == "position":  # group = position l, member s = sequence b
    scores_GxExS = probs_TxE.reshape(b, l, e).transpose(1, 2, 0)
    group_tok_G = jnp.arange(g, dtype=jnp.int32)  # token = s * L + g
    stride = l
  else:  # one group, member s = token t
    scores_GxExS = probs_TxE.T[None]
    group_tok_G = jnp.zeros((1,), jnp.int32)
    stride = 1
  w_GxExC, s_GxExC = jax.lax.top_k(scores_GxExS, c)
  tok_GxExC = s_GxExC.astype(jnp.int32) * stride + group_tok_G[:, None, None]
  exp_GxExC = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[None, :, None],
                               (g, e, c))
  rank_major = lambda a: a.transpose(2, 0, 1).reshape(-1)  # noqa: E731
  assignment = Assignment(token=rank_major(tok_GxExC),
                          expert=rank_major(exp_GxExC),
                          weight=rank_major(w_GxExC),
                          valid=jnp.ones((g * e * c,), bool))
  return assignment, probs_TxE


def num_slots(cfg: ml_collections.ConfigDict, shape_BxL: tuple[int, int]) -> int:
  """A = G * E * C for the `moe` config `cfg` (all slots are valid)."""
  g, s = group_layout(shape_BxL, cfg.expert_choice.group)
  return g * cfg.num_experts * expert_choice_capacity(
      s, cfg.num_experts, cfg.top_k, cfg.capacity_factor)


@register("expert_choice")
class ExpertChoiceRouter(Router):
  """Linear gate + `expert_choice_route`."""

  # Slots are expert-major, not one per token choice: no expert-parallel path.
  choice_major_slots = False
  adaptive = True  # a token gets 0..E experts

  @classmethod
  def is_causal(cls, cfg) -> bool:
    return cfg.moe.expert_choice.group == "position"

  @classmethod
  def decode_refusal(cls, cfg) -> str | None:
    return (f"moe.router='expert_choice' (group={cfg.moe.expert_choice.group!r}): experts "
            "pick among the tokens of a group, so a token's experts depend on the other "
            "tokens it competes with; routed one token at a time, every expert would take "
            "it (a dense mixture), which is not the routing the model was trained with")

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    del chosen
    choice(cfg.moe.expert_choice.group, "moe.expert_choice.group", GROUPS)

  @classmethod
  def experts_per_token(cls, cfg: ml_collections.ConfigDict) -> float:
    """E * C expert slots per group of S tokens (S = B, or B * L for group="batch")."""
    m, t = cfg.moe, cfg.train
    s = t.batch_size * (t.seq_len if m.expert_choice.group == "batch" else 1)
    return m.num_experts * expert_choice_capacity(s, m.num_experts, m.top_k,
                                                  m.capacity_factor) / s

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del token_ids, deterministic, carry, shared
    logits_TxE = gate_logits(self, x_TxD, self.cfg.num_experts)
    assignment, probs_TxE = expert_choice_route(
        logits_TxE, shape_BxL, self.cfg.top_k, self.cfg.capacity_factor,
        self.cfg.expert_choice.group)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE,
                        probs_TxE=probs_TxE)
