"""SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout: Scaling Dense and
Self-Slimmable Transformers").

A randomly initialised router that is never trained, and a number of active
experts per token that grows over training: k_t ramps from
`moe.smoe_dropout.k_start` to `k_end` between optimizer steps `ramp_begin`
and `ramp_stop` (a `moejax.schedules.Schedule` of shape `ramp_shape`,
rounded to the nearest integer). Each token takes the top k_t experts of its
frozen logits, weighted by the softmax of those k_t logits. Slots: T * k_end
(`k_end` must equal moe.top_k, the layer's slot buffer), choice-major;
choices c >= k_t are invalid, so a dropless dispatcher computes only k_t per
token.

The router's weight is the parameter `frozen_gate` [D, E] (fan-in normal
init): it is read under stop_gradient and, by its `frozen_` prefix, gets no
weight decay (moejax/train/optimizer.py), so training never changes it.
With a frozen router the balancing losses carry no gradient (they are
reported, not learnt from); the paper trains without them.

Self-slimmable inference (deterministic=True): `eval_k` experts per token (0:
k_end), 1 <= eval_k <= k_end; `tools/evaluate.py --k 1,2,4` scores a run at
several k.

Options under `moe.smoe_dropout`: k_start, k_end, ramp_begin, ramp_stop,
ramp_shape, eval_k.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.checks import choice, fail, positive_int
from moejax.layers import fan_in_init
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput
from moejax.moe.types import Assignment
from moejax.schedules import Schedule, scheduled
from moejax.train.optimizer import FROZEN_PREFIX

K_KEY = "moe.smoe_dropout.k"  # the schedule's name: active experts per token
RAMP_SHAPES = ("linear", "cosine", "step")
FROZEN = FROZEN_PREFIX + "gate"


def active_k(k_t: jax.Array, k_end: int) -> jax.Array:
  """int32 experts per token from the scheduled value: rounded, in [1, k_end]."""
  return jnp.clip(jnp.floor(k_t + 0.5), 1, k_end).astype(jnp.int32)


def smoe_dropout_route(logits_TxE: jax.Array, k: jax.Array | int, k_max: int
                       ) -> tuple[Assignment, jax.Array]:
  """Top-k_max slots of which the first k are live, weights softmax over the live logits;
  returns (assignment, probs_TxE = softmax over all experts)."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  l_TxK, e_TxK = jax.lax.top_k(logits_TxE, k_max)
  live_TxK = jnp.broadcast_to(jnp.arange(k_max) < k, l_TxK.shape)
  w_TxK = jax.nn.softmax(jnp.where(live_TxK, l_TxK, -jnp.inf), axis=-1)
  assignment = Assignment.from_choices(e_TxK, jnp.where(live_TxK, w_TxK, 0.0), live_TxK)
  return assignment, jax.nn.softmax(logits_TxE, axis=-1)


def eval_k(cfg_moe) -> int:
  opts = cfg_moe.smoe_dropout
  return opts.eval_k or opts.k_end


@register("smoe_dropout")
class SMoEDropoutRouter(Router):
  """Frozen random linear gate; top-k_t of its logits with k_t on a schedule."""

  adaptive = True  # k changes over training (and with eval_k)

  @classmethod
  def schedules(cls, cfg_moe) -> dict[str, Schedule]:
    o = cfg_moe.smoe_dropout
    return {K_KEY: Schedule(float(o.k_start), float(o.k_end), o.ramp_begin, o.ramp_stop,
                            o.ramp_shape)}

  @classmethod
  def expert_embedding(cls, cfg_moe):
    e = cfg_moe.num_experts
    return lambda params: params[FROZEN][:, :e].T.astype(jnp.float32)

  @classmethod
  def experts_per_token(cls, cfg) -> float:
    return cfg.moe.smoe_dropout.k_end  # the slots a step's static shapes hold

  @classmethod
  def inference_experts_per_token(cls, cfg) -> float:
    return eval_k(cfg.moe)

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    o, e = cfg.moe.smoe_dropout, cfg.moe.num_experts
    for key in ("k_start", "k_end"):
      positive_int(cfg, f"moe.smoe_dropout.{key}")
    positive_int(cfg, "moe.smoe_dropout.eval_k", allow_zero=True)
    choice(o.ramp_shape, "moe.smoe_dropout.ramp_shape", RAMP_SHAPES)
    cls.schedules(cfg.moe)[K_KEY].check("moe.smoe_dropout.ramp_",
                                        start="moe.smoe_dropout.k_start",
                                        end="moe.smoe_dropout.k_end")
    if o.k_start > o.k_end:
      fail("moe.smoe_dropout.k_start", o.k_start, f"must be <= moe.smoe_dropout.k_end="
           f"{o.k_end} (the ramp grows the active experts)")
    if o.eval_k > o.k_end:
      fail("moe.smoe_dropout.eval_k", o.eval_k, f"must be 0 (k_end) or at most "
           f"moe.smoe_dropout.k_end={o.k_end}")
    if not chosen:
      return
    if o.k_end > e:
      fail("moe.smoe_dropout.k_end", o.k_end, f"must be <= moe.num_experts={e}")
    if o.k_end != cfg.moe.top_k:
      fail("moe.smoe_dropout.k_end", o.k_end, f"must equal moe.top_k={cfg.moe.top_k}, the "
           "slots per token every dispatcher and count is sized by")

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: Any = None, shared: dict | None = None) -> RouterOutput:
    del shape_BxL, token_ids, carry
    d, o = x_TxD.shape[-1], self.cfg.smoe_dropout
    w_DxE = jax.lax.stop_gradient(self.param(FROZEN, fan_in_init(d), (d, self.cfg.num_experts)))
    logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), w_DxE, precision="highest")
    k = eval_k(self.cfg) if deterministic else active_k(scheduled(shared, K_KEY), o.k_end)
    assignment, probs_TxE = smoe_dropout_route(logits_TxE, k, o.k_end)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE, probs_TxE=probs_TxE)
