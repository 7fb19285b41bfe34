"""The MoE feed-forward layer: router -> dispatcher -> experts -> combine.

Config (`moe.*`): num_experts, top_k, router, dispatch, capacity_factor,
expert_hidden (F of each routed expert), num_shared_experts (dense SwiGLU
experts every token uses, DeepSeekMoE), aux_loss_weight, z_loss_weight and
the router's own options under `moe.<router>`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES, SwiGLU
from moejax.moe import losses as moe_losses
from moejax.moe import metrics as moe_metrics
from moejax.moe.dispatch import get_dispatcher
from moejax.moe.experts import Experts
from moejax.moe.routers import get_router


class MoELayer(nn.Module):
  """Routed SwiGLU experts (plus optional shared experts) on [B, L, D] inputs.

  Returns (y [B, L, D] float32, aux) with aux = {"losses": unweighted
  auxiliary losses, "metrics": routing metrics}; the trainer weights the
  losses with `moe.aux_loss_weight` / `moe.z_loss_weight`.
  """

  cfg: ml_collections.FrozenConfigDict  # the `moe` config
  dtype: str = "float32"
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, token_ids_BxL: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    ids_T = None if token_ids_BxL is None else token_ids_BxL.reshape(b * l)
    route = get_router(cfg.router)(cfg, name="router")(
        x_TxD, shape_BxL=(b, l), token_ids=ids_T, deterministic=deterministic)
    w = Experts(cfg.num_experts, cfg.expert_hidden, self.out_scale,
                name="experts")(d)
    y_TxD, stats = get_dispatcher(cfg.dispatch)(
        x_TxD, route.assignment, w, dtype=DTYPES[self.dtype], cfg=cfg)
    if cfg.num_shared_experts > 0:
      y_TxD = y_TxD + SwiGLU(cfg.num_shared_experts * cfg.expert_hidden,
                             self.dtype, self.out_scale, name="shared")(x_TxD)

    counts_E = route.assignment.expert_counts(route.probs_TxE.shape[-1])
    losses = {"load_balance": moe_losses.switch_load_balance(route.probs_TxE, counts_E),
              "z_loss": moe_losses.router_z_loss(route.logits_TxE),
              **route.losses}
    metrics = {**moe_metrics.load_metrics(counts_E),
               **moe_metrics.router_metrics(route.probs_TxE),
               "experts_per_token": jnp.sum(route.assignment.valid) / (b * l),
               "dropped_fraction": stats["dropped_fraction"],
               **route.metrics}
    return y_TxD.reshape(b, l, d), {"losses": losses, "metrics": metrics}
