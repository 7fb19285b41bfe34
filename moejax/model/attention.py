"""Causal multi-head self-attention with rotary position embeddings.

`CausalAttention` is the plain layer; `AttentionExperts` is a mixture of
attention experts (MoA, `model.attn_experts` > 0): E_a attention experts with
their own query and output projections and either one key/value projection
shared by all experts (`model.attn_shared_kv`) or their own, mixed per token
by top-k router weights (summing to 1 unless `model.attn_renormalize=False`;
top-1 of several experts needs the latter, see `moejax.config`). Every
expert is computed for every token (dense compute, exact and simple for
small E_a); tokens only *use* the k selected ones (params_active vs
flops_per_token in counting.py).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import fail, is_int, positive, refuse_constant_gate
from moejax.layers import DTYPES, dot, fan_in_init, linear
from moejax.moe.losses import router_z_loss, switch_load_balance
from moejax.moe.routers.topk import topk_route


def aux_losses(cfg) -> tuple[AuxLoss, ...]:
  """The attention experts' router losses (reported by every layer), if there are any."""
  if not cfg.model.get("attn_experts", 0):
    return ()
  return (AuxLoss("attn_load_balance", "model.attn_aux_loss_weight", per_moe_layer=False),
          AuxLoss("attn_z_loss", "model.attn_z_loss_weight", per_moe_layer=False))


def check_config(cfg) -> None:
  """model.attn_* (mixture of attention experts) and init.upcycle_attention."""
  m, init = cfg.model, cfg.get("init")
  e = m.get("attn_experts", 0)
  if not is_int(e) or e < 0:
    fail("model.attn_experts", e, "must be an integer >= 0 (0 = plain attention)")
  if e:
    k = m.attn_top_k
    if not is_int(k) or not 1 <= k <= e:
      fail("model.attn_top_k", k, f"must be an integer in [1, model.attn_experts={e}]")
    for key in ("model.attn_aux_loss_weight", "model.attn_z_loss_weight"):
      positive(cfg, key, allow_zero=True)
    refuse_constant_gate("model.attn_top_k", k, "model.attn_renormalize",
                         m.get("attn_renormalize", True), e)
  up = init is not None and init.get("upcycle_attention", False)
  if up and not init.from_dense:
    fail("init.upcycle_attention", up, "needs init.from_dense (the dense run whose "
         "attention is copied into the attention experts)")
  if up and not e:
    fail("init.upcycle_attention", up, "needs model.attn_experts > 0")
  if init is not None and init.from_dense and e and not up:
    fail("model.attn_experts", e, "with init.from_dense needs init.upcycle_attention=True "
         "(the dense attention is copied into every attention expert)")


def rope(x_BxLxHxK: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) at positions 0..L-1, float32."""
  _, l, _, k = x_BxLxHxK.shape
  half = k // 2
  freq_H = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang_LxH = jnp.arange(l, dtype=jnp.float32)[:, None] * freq_H[None, :]
  cos, sin = jnp.cos(ang_LxH)[None, :, None, :], jnp.sin(ang_LxH)[None, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class CausalAttention(nn.Module):
  """Pre-projected MHA; a token attends to itself and earlier positions only."""

  num_heads: int
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    _, l, d = x_BxLxD.shape
    h = self.num_heads
    k = d // h
    dt = DTYPES[self.dtype]
    w_qkv = self.param("w_qkv", fan_in_init(d), (d, 3, h, k))
    w_out = self.param("w_out", fan_in_init(d, self.out_scale), (h, k, d))
    b = x_BxLxD.shape[0]
    qkv = linear(x_BxLxD, w_qkv.reshape(d, 3 * h * k), dt).reshape(b, l, 3, h, k)
    o_BxLxHxK = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.rope_theta, dt)
    return linear(o_BxLxHxK.reshape(b, l, h * k), w_out.reshape(h * k, d), dt)


def attend(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
           rope_theta: float, dt) -> jax.Array:
  """Causal softmax attention of projected q, k, v (RoPE on q and k); float32 [B, L, H, K]."""
  l, k = q_BxLxHxK.shape[1], q_BxLxHxK.shape[-1]
  q = rope(q_BxLxHxK, rope_theta)
  kk = rope(k_BxLxHxK, rope_theta)
  s_BxHxLxL = dot("blhk,bmhk->bhlm", q, kk, dt) / math.sqrt(k)
  causal_LxL = jnp.tril(jnp.ones((l, l), bool))
  s_BxHxLxL = jnp.where(causal_LxL, s_BxHxLxL, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s_BxHxLxL, axis=-1)
  return dot("bhlm,bmhk->blhk", p, v_BxLxHxK, dt)


def attention_route(logits_TxE: jax.Array, k: int, renormalize: bool = True
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax top-k over attention experts: (combine [T, E], losses).

  renormalize: the k weights sum to 1 (what upcycled copies of one attention
  need to reproduce it); else they are the softmax probabilities.

  losses = {"attn_load_balance": switch balance (1 when balanced),
  "attn_z_loss": router z-loss}, unweighted, float32.
  """
  t, e = logits_TxE.shape
  assignment, probs_TxE = topk_route(logits_TxE, k, "softmax_topk", renormalize=renormalize)
  losses = {"attn_load_balance": switch_load_balance(probs_TxE, assignment.expert_counts(e)),
            "attn_z_loss": router_z_loss(logits_TxE)}
  return assignment.combine_matrix(t, e), losses


class AttentionExperts(nn.Module):
  """Mixture of attention experts on [B, L, D] -> (y [B, L, D] float32, losses).

  Parameters: router [D, E] (float32 logits); shared_kv: w_q [E, D, H, K],
  w_kv [D, 2, H, K]; else w_qkv [E, D, 3, H, K]; w_out [E, H, K, D]. Expert e
  with w_q = w_qkv[..., 0] etc. computes exactly `CausalAttention`, so copies
  of a dense layer mixed with weights summing to 1 give the dense output.
  The output is sum_e c[t, e] * o_e[t] @ w_out[e], one [T, E*H*K] x
  [E*H*K, D] matmul.
  """

  num_heads: int
  num_experts: int
  top_k: int
  shared_kv: bool
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  out_scale: float = 1.0
  renormalize: bool = True

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, l, d = x_BxLxD.shape
    h, e = self.num_heads, self.num_experts
    k = d // h
    dt = DTYPES[self.dtype]
    w_DxE = self.param("router", fan_in_init(d), (d, e))
    if self.shared_kv:
      w_q = self.param("w_q", fan_in_init(d), (e, d, h, k))
      w_kv = self.param("w_kv", fan_in_init(d), (d, 2, h, k))
      q_BxLxExHxK = linear(x_BxLxD, jnp.moveaxis(w_q, 0, 1).reshape(d, e * h * k),
                           dt).reshape(b, l, e, h, k)
      kv = linear(x_BxLxD, w_kv.reshape(d, 2 * h * k), dt).reshape(b, l, 1, 2, h, k)
      kv_BxLxEx2xHxK = jnp.broadcast_to(kv, (b, l, e, 2, h, k))
    else:
      w_qkv = self.param("w_qkv", fan_in_init(d), (e, d, 3, h, k))
      qkv = linear(x_BxLxD, jnp.moveaxis(w_qkv, 0, 1).reshape(d, e * 3 * h * k),
                   dt).reshape(b, l, e, 3, h, k)
      q_BxLxExHxK, kv_BxLxEx2xHxK = qkv[:, :, :, 0], qkv[:, :, :, 1:]
    w_out = self.param("w_out", fan_in_init(d, self.out_scale), (e, h, k, d))
    # Experts fold into the head axis: E*H independent causal heads.
    o = attend(q_BxLxExHxK.reshape(b, l, e * h, k),
               kv_BxLxEx2xHxK[:, :, :, 0].reshape(b, l, e * h, k),
               kv_BxLxEx2xHxK[:, :, :, 1].reshape(b, l, e * h, k), self.rope_theta, dt)
    x_TxD = x_BxLxD.reshape(b * l, d).astype(jnp.float32)
    logits_TxE = jnp.dot(x_TxD, w_DxE, precision="highest")
    combine_TxE, losses = attention_route(logits_TxE, self.top_k, self.renormalize)
    o_TxExHxK = o.reshape(b * l, e, h, k) * combine_TxE[:, :, None, None]
    y_TxD = linear(o_TxExHxK.reshape(b * l, e * h * k), w_out.reshape(e * h * k, d), dt)
    return y_TxD.reshape(b, l, d), losses
