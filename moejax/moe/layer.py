"""The MoE feed-forward layer: router -> dispatcher -> experts -> combine.

Config (`moe.*`): num_experts, top_k, router, dispatch, capacity_factor,
expert_hidden (F of each routed expert), num_shared_experts (dense SwiGLU
experts every token uses, DeepSeekMoE), aux_loss_weight, z_loss_weight and
the router's own options under `moe.<router>`. A router returning a
`SoftAssignment` (soft) is applied by the soft dispatcher whatever
`moe.dispatch` is, and reports load 1/E per expert and E experts per token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES, SwiGLU
from moejax.moe import losses as moe_losses
from moejax.moe import metrics as moe_metrics
from moejax.moe.dispatch import expert_parallel, get_dispatcher
from moejax.moe.dispatch.soft import soft_dispatch
from moejax.moe.experts import Experts
from moejax.moe.routers import get_router
from moejax.moe.types import SoftAssignment


class MoELayer(nn.Module):
  """Routed SwiGLU experts (plus optional shared experts) on [B, L, D] inputs.

  Returns (y [B, L, D] float32, aux, router carry) with aux = {"losses":
  auxiliary losses, "metrics": routing metrics, "state_stats": what the
  router's non-trained state update needs}. The trainer weights
  `load_balance` / `z_loss` with `moe.aux_loss_weight` / `moe.z_loss_weight`
  and adds other losses (already weighted by their router) as they are.
  """

  cfg: ml_collections.FrozenConfigDict  # the `moe` config
  dtype: str = "float32"
  out_scale: float = 1.0

  def _balance(self, kinds, route, balance_E: jax.Array, b: int, l: int) -> dict:
    """The balancing losses named in moe.balance (unweighted)."""
    out = {}
    probs = route.probs_TxE
    if "switch" in kinds:
      out["load_balance"] = moe_losses.switch_load_balance(probs, balance_E)
    if "global_batch" in kinds:
      # Counts over the whole global batch: summed over devices by the SPMD
      # program itself, and over gradient-accumulation micro-batches by the
      # trainer, which passes them in the "balance" collection.
      counts = (self.get_variable("balance", "counts")
                if self.has_variable("balance", "counts") else balance_E)
      out["global_balance"] = moe_losses.switch_load_balance(probs, counts)
    if "sequence" in kinds:
      a = route.assignment
      seq_A = a.token // l
      counts_BxE = jnp.zeros((b, probs.shape[-1]), jnp.float32).at[seq_A, a.expert].add(
          a.valid.astype(jnp.float32))
      out["sequence_balance"] = moe_losses.sequence_load_balance(probs, counts_BxE, b)
    return out

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, token_ids_BxL: jax.Array | None = None,
               router_carry: Any = None, shared: dict | None = None,
               deterministic: bool = True) -> tuple[jax.Array, dict, Any]:
    cfg = self.cfg
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    ids_T = None if token_ids_BxL is None else token_ids_BxL.reshape(b * l)
    router_cls = get_router(cfg.router)
    extra = {}
    if getattr(router_cls, "uses_carry", False):
      extra = {"carry": router_carry, "shared": shared}
    route = router_cls(cfg, name="router")(
        x_TxD, shape_BxL=(b, l), token_ids=ids_T, deterministic=deterministic, **extra)
    # Routing capture for moejax.analysis: a no-op unless "intermediates" is mutable.
    sown = {"assignment": route.assignment}
    if route.probs_TxE is not None:
      sown["probs_TxE"] = route.probs_TxE
    self.sow("intermediates", "routing", sown)
    w = Experts(cfg.num_experts, cfg.expert_hidden, self.out_scale,
                name="experts")(d)
    soft = isinstance(route.assignment, SoftAssignment)
    # A SoftAssignment (Soft MoE) always goes to the soft dispatcher: the
    # sparse dispatchers named by moe.dispatch take an `Assignment`.
    dispatch = soft_dispatch if soft else get_dispatcher(cfg.dispatch)
    if not soft:  # inside a multi-device mesh: the shard_map expert-parallel path
      dispatch = expert_parallel.select(cfg, router_cls, b * l) or dispatch
    y_TxD, stats = dispatch(x_TxD, route.assignment, w, dtype=DTYPES[self.dtype], cfg=cfg)
    if cfg.num_shared_experts > 0:
      y_TxD = y_TxD + SwiGLU(cfg.num_shared_experts * cfg.expert_hidden,
                             self.dtype, self.out_scale, name="shared")(x_TxD)

    if soft:  # every expert processes the same number of slots: uniform load
      counts_E = jnp.ones((cfg.num_experts,), jnp.float32)
      experts_per_token = jnp.asarray(cfg.num_experts, jnp.float32)
    else:
      counts_E = route.assignment.expert_counts(cfg.num_experts)
      experts_per_token = jnp.sum(route.assignment.valid) / (b * l)
    zero = jnp.zeros((), jnp.float32)
    kinds = moe_losses.balance_kinds(cfg)
    losses = {moe_losses.BALANCE_KINDS[k]: zero for k in kinds}
    losses["z_loss"] = zero
    metrics = {**moe_metrics.load_metrics(counts_E),
               "router_entropy": zero, "top1_prob": zero,
               "experts_per_token": experts_per_token,
               "dropped_fraction": stats["dropped_fraction"],
               # Router-specific entries of the fixed schema; routers that have
               # them override these in `route.metrics`.
               "overflow_fraction": zero, "null_fraction": zero,
               "bias_norm": zero, "l1_coef": zero}
    balance_E = counts_E
    if route.probs_TxE is not None:
      if route.balance_counts_E is not None:
        balance_E = route.balance_counts_E
      balance_E = jnp.broadcast_to(balance_E, route.probs_TxE.shape[-1:])
      losses.update(self._balance(kinds, route, balance_E, b, l))
      metrics.update(moe_metrics.router_metrics(route.probs_TxE))
    if route.logits_TxE is not None:
      losses["z_loss"] = moe_losses.router_z_loss(route.logits_TxE)
    losses.update(route.losses)
    unknown = set(route.metrics) - set(metrics)
    if unknown:
      raise ValueError(f"router {cfg.router!r} reports metrics {sorted(unknown)} outside "
                       f"the MoE metric schema {sorted(metrics)}")
    metrics.update(route.metrics)
    aux = {"losses": losses, "metrics": metrics, "state_stats": route.state_stats,
           "balance_counts": balance_E.astype(jnp.float32)}
    new_carry = route.carry if extra else router_carry
    return y_TxD.reshape(b, l, d), aux, new_carry
