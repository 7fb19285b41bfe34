"""Layerwise recurrent router (RMoE, Qiu et al. 2024).

Each MoE layer projects its input to a small router space, r = x @ w_in
[D, R] (per layer, scanned like other params); one GRU cell *shared by all
layers* updates the router state carried from the previous MoE layer,
h = GRU(r, h_prev) (h_prev = 0 at the first MoE layer); the layer's logits
are h @ w_out [R, E] (per layer), followed by softmax and top-k exactly as
`topk_route` with `moe.topk.order` / `moe.topk.renormalize`. The state
[T, R] is part of the layer scan's carry (`uses_carry`), the GRU weights are
created once in the model scope (`make_shared`) and broadcast into the scan,
so their gradient sums the contributions of every layer. Per-token, so
causal.

Options under `moe.recurrent`: hidden (R).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import fan_in_init
from moejax.checks import positive
from moejax.moe.routers import register
from moejax.moe.routers.base import Router, RouterOutput
from moejax.moe.routers.topk import topk_route

GRUParams = dict[str, jax.Array]  # w_ih [R, 3R], w_hh [R, 3R], b_ih [3R], b_hh [3R]


def gru_cell(p: GRUParams, x_TxR: jax.Array, h_TxR: jax.Array) -> jax.Array:
  """One GRU step (Cho et al. 2014, PyTorch gate layout [reset, update, new]).

  r = sigmoid(x Wir + bir + h Whr + bhr), z = sigmoid(x Wiz + biz + h Whz + bhz),
  n = tanh(x Win + bin + r * (h Whn + bhn)), h' = (1 - z) * n + z * h.
  """
  hp = jax.lax.Precision.HIGHEST
  gi = jnp.dot(x_TxR, p["w_ih"], precision=hp) + p["b_ih"]
  gh = jnp.dot(h_TxR, p["w_hh"], precision=hp) + p["b_hh"]
  ir, iz, in_ = jnp.split(gi, 3, axis=-1)
  hr, hz, hn = jnp.split(gh, 3, axis=-1)
  r = jax.nn.sigmoid(ir + hr)
  z = jax.nn.sigmoid(iz + hz)
  n = jnp.tanh(in_ + r * hn)
  return (1.0 - z) * n + z * h_TxR


@register("recurrent")
class RecurrentRouter(Router):
  """Per-layer projections w_in / w_out around the shared GRU cell."""

  uses_carry = True

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    del chosen
    positive(cfg, "moe.recurrent.hidden")

  @classmethod
  def init_carry(cls, num_tokens: int, cfg: ml_collections.FrozenConfigDict) -> jax.Array:
    """Router state before the first MoE layer: zeros [T, R] float32."""
    return jnp.zeros((num_tokens, cfg.recurrent.hidden), jnp.float32)

  @classmethod
  def make_shared(cls, module: nn.Module, d: int, cfg: ml_collections.FrozenConfigDict
                  ) -> GRUParams:
    """The GRU cell's params, created in `module`'s (the model's) scope."""
    del d
    r = cfg.recurrent.hidden
    init = fan_in_init(r)
    return {
        "w_ih": module.param("router_gru_w_ih", init, (r, 3 * r)),
        "w_hh": module.param("router_gru_w_hh", init, (r, 3 * r)),
        "b_ih": module.param("router_gru_b_ih", nn.initializers.zeros, (3 * r,)),
        "b_hh": module.param("router_gru_b_hh", nn.initializers.zeros, (3 * r,)),
    }

  @classmethod
  def expert_embedding(cls, cfg_moe):
    del cfg_moe
    return None  # its logits read the GRU state, not a linear gate on the token

  @classmethod
  def param_count(cls, cfg: ml_collections.ConfigDict, d_model: int) -> int:
    """Router parameters per MoE layer (w_in, w_out; not the shared GRU)."""
    r = cfg.recurrent.hidden
    return d_model * r + r * cfg.num_experts

  @classmethod
  def shared_param_count(cls, cfg: ml_collections.ConfigDict, d_model: int) -> int:
    """Parameters of the GRU cell shared by all MoE layers."""
    del d_model
    r = cfg.recurrent.hidden
    return 2 * (3 * r * r + 3 * r)

  @nn.compact
  def __call__(self, x_TxD: jax.Array, *, shape_BxL: tuple[int, int],
               token_ids: jax.Array | None = None, deterministic: bool = True,
               carry: jax.Array | None = None, shared: GRUParams | None = None
               ) -> RouterOutput:
    del shape_BxL, token_ids, deterministic
    cfg = self.cfg
    r = cfg.recurrent.hidden
    d = x_TxD.shape[-1]
    if carry is None:
      carry = self.init_carry(x_TxD.shape[0], cfg)
    if shared is None:  # a lone layer (tests, tools): its own GRU cell
      shared = self.make_shared(self, d, cfg)
    w_in_DxR = self.param("w_in", fan_in_init(d), (d, r))
    w_out_RxE = self.param("w_out", fan_in_init(r), (r, cfg.num_experts))
    x_TxR = jnp.dot(x_TxD.astype(jnp.float32), w_in_DxR, precision="highest")
    h_TxR = gru_cell(shared, x_TxR, carry.astype(jnp.float32))
    logits_TxE = jnp.dot(h_TxR, w_out_RxE, precision="highest")
    assignment, probs_TxE = topk_route(logits_TxE, cfg.top_k, cfg.topk.order,
                                       cfg.topk.renormalize)
    return RouterOutput(assignment=assignment, logits_TxE=logits_TxE,
                        probs_TxE=probs_TxE, carry=h_TxR)
