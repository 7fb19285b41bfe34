"""BIP-based balancing (Yuan Sun, arXiv:2502.15451): top-k of scores - q, q from the BIP's dual.

Sun, "Binary-Integer-Programming Based Algorithm for Expert Load Balancing in
Mixture-of-Experts Models" (2025). The balanced routing of a batch's T tokens
to E experts is the binary integer program

  max sum_te s_te x_te   s.t.  sum_e x_te <= k (each token),  sum_t x_te <= C (each expert),
                               x_te in {0, 1},

with s = softmax(logits) and the capacity C = ceil(capacity_factor * k * T / E)
(at most T). Its linear relaxation has the dual

  min  k sum_t p_t + C sum_e q_e + sum_te max(0, s_te - p_t - q_e)   over p [T], q [E] >= 0,

an upper bound on the BIP's optimum (`dual_objective`). Minimising it over p
with q fixed, or over q with p fixed, is exact and costs one top-k:

  p_t = max(0, (k+1)-th largest of s_t. - q)                          (0 when k = E)
  q_e = max(0, midpoint of the C-th and (C+1)-th largest of s_.e - p)   (0 when C >= T)

`iterations` alternating updates (p, then q; `solve_duals`) never increase
the dual objective. Each token then takes the top-k of s_t - q: an expert with
q_e > 0 is pushed down for every token, most for the tokens that prefer it
least, so over-full experts shed their weakest tokens to the next best ones.
Any q_e between the two order statistics minimises the dual over q_e; the
paper takes the (C+1)-th, where that token's s - q ties exactly with its
alternative and top-k keeps it on the full expert; the midpoint separates
the C-th and (C+1)-th tokens. Block updates can stop short of the dual's
minimum, so even many iterations do not always give loads <= C (on 90
enumerated tiny batches, 50 iterations: 87 within capacity, 83 at the BIP's
optimum; tests/moe/test_router_bip.py), and a few give an approximate
balance: the `over_capacity` metric reports the share of slots beyond C.

The experts' output weights are the unshifted s of the chosen experts
(normalised over the k with `renormalize`): q changes which experts a token
uses, never the weights, and gets no gradient (it is computed from
stop_gradient(s)). `probs_TxE` = s (switch balancing loss, entropy, top-1
metrics); `logits_TxE` = the logits (z-loss).

Two registered names, one file:
  bip         q is solved on every batch, warm-started at the q kept in
              "moe_state", and that batch is routed with it. A token's experts
              depend on every token of its batch, later positions of its own
              sequence included: not causal, and a token routed alone (KV-cache
              decoding) gets other experts than inside its batch (decoding is
              refused). Evaluation solves on the evaluated batch too.
  bip_causal  the batch is routed with the q kept in "moe_state" only; the q
              solved on this batch (warm-started there) replaces it after the
              optimizer step. Routing at step t uses q solved on steps < t:
              causal, and a token is routed alone exactly as in its batch.
In both, `update_state` sets "moe_state" "q" [E] to the mean of the q's solved
on the step's micro-batches (inside the jitted step a micro-batch is the
global one: every data-parallel device's tokens take part in its solve).

Options under `moe.bip`: iterations, capacity_factor, renormalize.
Metrics: `q_norm` (of the q that routed the batch), `over_capacity`
(sum_e max(0, load_e - C) / (k T)).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import fail, positive_int, refuse_constant_gate
from moejax.moe.metrics import Metric
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.types import Assignment


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * k * T / E), at most T: each expert's target load.

  (1e-9 below the float product, so 1.3 * 10 = 13.000000000000002 counts as 13.)
  """
  return min(num_tokens, math.ceil(capacity_factor * k * num_tokens / num_experts - 1e-9))


def _nth_largest(x: jax.Array, n: int) -> jax.Array:
  """The n-th largest value (n >= 1) along the last axis."""
  return jax.lax.top_k(x, n)[0][..., n - 1]


def update_p(s_TxE: jax.Array, q_E: jax.Array, k: int) -> jax.Array:
  """argmin over p >= 0 of the dual with q fixed: max(0, (k+1)-th largest of s_t - q)."""
  t, e = s_TxE.shape
  if k >= e:
    return jnp.zeros((t,), jnp.float32)
  return jax.nn.relu(_nth_largest(s_TxE - q_E[None, :], k + 1))


def update_q(s_TxE: jax.Array, p_T: jax.Array, c: int) -> jax.Array:
  """A minimiser over q >= 0 of the dual with p fixed: the clipped midpoint of the
  C-th and (C+1)-th largest of s_.e - p."""
  t, e = s_TxE.shape
  if c >= t:
    return jnp.zeros((e,), jnp.float32)
  top_ExC1 = jax.lax.top_k((s_TxE - p_T[:, None]).T, c + 1)[0]
  return jax.nn.relu(0.5 * (top_ExC1[:, c - 1] + top_ExC1[:, c]))


def solve_duals(s_TxE: jax.Array, q_E: jax.Array, k: int, c: int, iterations: int
                ) -> tuple[jax.Array, jax.Array]:
  """(p [T], q [E]) after `iterations` alternating block updates from q_E (p first)."""
  s_TxE = jax.lax.stop_gradient(s_TxE.astype(jnp.float32))

  def body(_, pq):
    p_T = update_p(s_TxE, pq[1], k)
    return p_T, update_q(s_TxE, p_T, c)

  p0 = jnp.zeros(s_TxE.shape[:1], jnp.float32)
  q0 = jax.lax.stop_gradient(q_E.astype(jnp.float32))
  return jax.lax.fori_loop(0, iterations, body, (p0, q0))


def dual_objective(s_TxE: jax.Array, p_T: jax.Array, q_E: jax.Array, k: int, c: int
                   ) -> jax.Array:
  """k sum p + C sum q + sum max(0, s - p - q): for p, q >= 0 an upper bound on the BIP optimum."""
  slack = jax.nn.relu(s_TxE - p_T[:, None] - q_E[None, :])
  return k * jnp.sum(p_T) + c * jnp.sum(q_E) + jnp.sum(slack)


def bip_route(logits_TxE: jax.Array, q_E: jax.Array, k: int, iterations: int,
              capacity_factor: float = 1.0, renormalize: bool = True, causal: bool = False
              ) -> tuple[Assignment, jax.Array, jax.Array, jax.Array]:
  """Pure routing math; returns (assignment, probs_TxE, q that routed, q solved on this batch).

  `q_E` is the kept q: the warm start of the solve, and with `causal` the q
  that routes. Slots are choice-major (slot c*T + t is token t's c-th choice
  by s - q).
  """
  probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
  t, e = probs_TxE.shape
  s_TxE = jax.lax.stop_gradient(probs_TxE)
  _, q_next_E = solve_duals(s_TxE, q_E, k, capacity(t, e, k, capacity_factor), iterations)
  q_route_E = jax.lax.stop_gradient(q_E.astype(jnp.float32)) if causal else q_next_E
  _, e_TxK = jax.lax.top_k(s_TxE - q_route_E[None, :], k)
  w_TxK = jnp.take_along_axis(probs_TxE, e_TxK, axis=-1)
  if renormalize:
    w_TxK = w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  assignment = Assignment.from_choices(e_TxK, w_TxK)
  return assignment, probs_TxE, q_route_E, q_next_E


@register("bip")
class BIPRouter(Router):
  """Linear gate + `bip_route`, q solved on the batch itself ("moe_state" "q" [E]: its warm start)."""

  causal: ClassVar[bool] = False  # bip_causal: route with the kept q only

  @classmethod
  def is_causal(cls, cfg) -> bool:
    return cls.causal

  @classmethod
  def decode_refusal(cls, cfg) -> str | None:
    if cls.causal:
      return None
    return ("moe.router='bip' solves its expert offsets q on every batch from all of the "
            "batch's tokens (later positions of a sequence too), so a token routed alone "
            "gets other experts than inside its batch; moe.router='bip_causal' routes with "
            "q from past steps only and decodes")

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    return ("q",)

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    return (Metric("q_norm"), Metric("over_capacity", summary=True))

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    opts = cfg.moe.bip
    positive_int(cfg, "moe.bip.iterations")
    f = opts.capacity_factor
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1.0:
      fail("moe.bip.capacity_factor", f, "allowed: a number >= 1 (the experts' capacity "
           "C = ceil(capacity_factor * top_k * T / E) must hold the batch's k T slots)")
    if chosen:
      refuse_constant_gate("moe.top_k", cfg.moe.top_k, "moe.bip.renormalize", opts.renormalize,
                           cfg.moe.num_experts)

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, deterministic, carry, shared
    e, k = self.cfg.num_experts, self.cfg.top_k
    if self.has_variable("moe_state", "q") or self.is_mutable_collection("moe_state"):
      q_E = self.variable("moe_state", "q", jnp.zeros, (e,), jnp.float32).value
    else:  # applied without its "moe_state" (a fresh model): the initial q
      q_E = jnp.zeros((e,), jnp.float32)
    logits_TxE = gate_logits(self, x_TxD, e)
    opts = self.cfg.bip
    assignment, probs_TxE, q_route_E, q_next_E = bip_route(
        logits_TxE, q_E, k, opts.iterations, opts.capacity_factor, opts.renormalize,
        causal=type(self).causal)
    t = x_TxD.shape[0]
    counts_E = jax.lax.stop_gradient(assignment.expert_counts(e))
    c = capacity(t, e, k, opts.capacity_factor)
    over = jnp.sum(jax.nn.relu(counts_E - c)) / (k * t)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE, probs_TxE=probs_TxE,
                        metrics={"q_norm": jnp.linalg.norm(q_route_E), "over_capacity": over},
                        state_stats={"q": q_next_E, "batches": jnp.ones((), jnp.float32)})

  @classmethod
  def update_state(cls, state: dict, stats: dict, cfg: ml_collections.FrozenConfigDict) -> dict:
    """"q" := the mean of the q's solved on the step's micro-batches (summed in `stats`)."""
    return {**state, "q": stats["q"] / jnp.maximum(stats["batches"], 1.0)}


@register("bip_causal")
class BIPCausalRouter(BIPRouter):
  """`bip` routing with the q kept from past steps; this batch's solve only updates it."""

  causal = True
