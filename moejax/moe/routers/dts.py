"""Dense-to-sparse gate (Nie et al. 2021, "EvoMoE: An Evolutional Mixture-of-Experts
Training Framework via Dense-To-Sparse Gate").

Training starts dense and anneals to sparse. The gate is a Gumbel-softmax

    G_TxE = softmax((x @ w_gate + g) / tau_t),  g ~ Gumbel(0, 1) iid (`gumbel`),

with the temperature tau_t on a schedule from `temperature_start` to
`temperature_end` between steps `anneal_begin` and `anneal_stop`
(`anneal_shape`, default exponential). While annealing, each token uses
every expert whose gate weight is >= `threshold` (always its best one), with
the gate weights as combine weights: at a high temperature that is all E
experts, a softened dense mixture, and fewer as tau_t falls. From
`anneal_stop` on (a step schedule "moe.dts.sparse" going 0 -> 1), each token
uses its top moe.top_k experts of G, weighted by their gate weights.
Inference (deterministic=True): the top-k of the clean logits, weighted by
softmax(logits / temperature_end), what training converges to without noise.

Slots: T * E in training (choice-major, by descending gate weight, invalid
where unused; a dropless dispatcher computes only the live ones), T * k at
inference. Counting takes E experts per training token (the dense phase
bounds a step's static shapes) and k at inference; the layer's
`experts_per_token` metric shows the live ones fall from E to k.

Options under `moe.dts`: temperature_start, temperature_end, anneal_begin,
anneal_stop, anneal_shape, threshold, gumbel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.checks import fail, positive
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput, gate_logits
from moejax.moe.routers.topk import topk_route
from moejax.moe.types import Assignment
from moejax.schedules import Schedule, scheduled

TEMPERATURE = "moe.dts.temperature"
SPARSE = "moe.dts.sparse"  # 0 while annealing, 1 from anneal_stop on


def dts_route(logits_TxE: jax.Array, noise_TxE: jax.Array | None, temperature: jax.Array,
              threshold: float, sparse: jax.Array, k: int
              ) -> tuple[Assignment, jax.Array]:
  """Training routing; returns (assignment over T * E slots, gate_TxE).

  Live slots: gate >= threshold (and each token's best) while `sparse` is 0, the top k
  when it is 1; combine weights: the gate weights.
  """
  e = logits_TxE.shape[-1]
  z_TxE = logits_TxE.astype(jnp.float32)
  if noise_TxE is not None:
    z_TxE = z_TxE + noise_TxE
  gate_TxE = jax.nn.softmax(z_TxE / temperature, axis=-1)
  w_TxE, e_TxE = jax.lax.top_k(gate_TxE, e)
  c_E = jnp.arange(e)
  dense_TxE = (w_TxE >= threshold) | (c_E == 0)
  live_TxE = jnp.where(sparse > 0.5, jnp.broadcast_to(c_E < k, w_TxE.shape), dense_TxE)
  assignment = Assignment.from_choices(e_TxE, jnp.where(live_TxE, w_TxE, 0.0), live_TxE)
  return assignment, gate_TxE


def inference_route(logits_TxE: jax.Array, temperature: float, k: int) -> Assignment:
  """Top k of the clean logits, weights softmax(logits / temperature) at the k (Switch's
  softmax-then-top-k of the tempered logits)."""
  return topk_route(logits_TxE.astype(jnp.float32) / temperature, k)[0]


@register("dts")
class DTSRouter(Router):
  """Linear gate; Gumbel-softmax annealed from dense (threshold) to top-k."""

  adaptive = True

  @classmethod
  def schedules(cls, cfg_moe) -> dict[str, Schedule]:
    o = cfg_moe.dts
    return {TEMPERATURE: Schedule(o.temperature_start, o.temperature_end, o.anneal_begin,
                                  o.anneal_stop, o.anneal_shape),
            SPARSE: Schedule(0.0, 1.0, o.anneal_stop, o.anneal_stop, "step")}

  @classmethod
  def experts_per_token(cls, cfg) -> float:
    return cfg.moe.num_experts

  @classmethod
  def inference_experts_per_token(cls, cfg) -> float:
    return cfg.moe.top_k

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    del chosen
    o = cfg.moe.dts
    for key in ("temperature_start", "temperature_end"):
      positive(cfg, f"moe.dts.{key}")
    if not 0.0 <= o.threshold < 1.0 or isinstance(o.threshold, bool):
      fail("moe.dts.threshold", o.threshold, "must be in [0, 1)")
    cls.schedules(cfg.moe)[TEMPERATURE].check("moe.dts.anneal_",
                                               start="moe.dts.temperature_start",
                                               end="moe.dts.temperature_end")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, carry
    o, e, k = self.cfg.dts, self.cfg.num_experts, self.cfg.top_k
    logits_TxE = gate_logits(self, x_TxD, e)
    if deterministic:
      assignment = inference_route(logits_TxE, o.temperature_end, k)
    else:
      noise = (jax.random.gumbel(self.make_rng("router"), logits_TxE.shape, jnp.float32)
               if o.gumbel else None)
      assignment, _ = dts_route(logits_TxE, noise, scheduled(shared, TEMPERATURE),
                                o.threshold, scheduled(shared, SPARSE), k)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE,
                        probs_TxE=jax.nn.softmax(logits_TxE, axis=-1))
