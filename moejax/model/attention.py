"""Causal multi-head self-attention with rotary position embeddings.

`CausalAttention` is the plain layer: multi-head or grouped-query
(`model.num_kv_heads` < num_heads; 1 = multi-query), head width
`model.head_dim` (0 = d_model / num_heads), biases `model.attn_bias`
("qkv" as Qwen2, "qkvo" also on the output), q/k RMSNorms `model.qk_norm`
("head": per head as Qwen3, "full": over the whole projection as OLMoE;
epsilon `model.norm_eps`), RoPE at positions 0..L-1 or given positions.
`attention_heads` (the per-head outputs) and `output_projection` are its two
halves, shared with Mixture-of-Head attention (head_experts.py), which
weights the heads in between. Multi-head latent attention is in
latent_attention.py. `AttentionExperts` is a mixture of
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
import flax.struct
import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import fail, is_int, positive, refuse_constant_gate
from moejax.layers import DTYPES, RMSNorm, dot, fan_in_init, linear
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
    plain = {"attention": "mha", "num_kv_heads": 0, "head_dim": 0, "attn_bias": "none",
             "qk_norm": "none"}
    same = {"num_kv_heads": m.num_heads, "head_dim": m.d_model // m.num_heads}  # = 0
    for key, want in plain.items():
      got = m.get(key, want)
      if got != want and got != same.get(key, want):
        fail(f"model.{key}", got, f"must be {want!r} with model.attn_experts={e} (attention "
             "experts are plain multi-head attention)")
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


def rope(x_BxLxHxK: jax.Array, theta: float, positions_BxL: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (rotate-half form), float32; positions default to 0..L-1."""
  _, l, _, k = x_BxLxHxK.shape
  half = k // 2
  freq_H = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  pos = (jnp.arange(l, dtype=jnp.float32)[None] if positions_BxL is None
         else positions_BxL.astype(jnp.float32))
  ang_BxLxH = pos[..., None] * freq_H
  cos, sin = jnp.cos(ang_BxLxH)[:, :, None, :], jnp.sin(ang_BxLxH)[:, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


CAUSAL_BLOCK = 128  # causal attention over L >= 2 blocks runs query block by query block


def attend(q_BxLxHxK: jax.Array, k_BxMxGxK: jax.Array, v_BxMxGxV: jax.Array, dt,
           scale: float | None = None, mask_BxLxM: jax.Array | None = None) -> jax.Array:
  """Softmax attention of rotated q [.., H, K] over k, v of G = H / r groups.

  Grouped-query attention: query head h reads key/value head h // r (no
  repeated copies); G = H is multi-head attention. The mask defaults to
  causal over M = L keys; a decoder passes its cache mask (M cache slots).
  Returns float32 [B, L, H, V].
  """
  b, l, h, kd = q_BxLxHxK.shape
  g = k_BxMxGxK.shape[2]
  scale = 1.0 / math.sqrt(kd) if scale is None else scale
  if mask_BxLxM is None and l >= 2 * CAUSAL_BLOCK:
    # Causal: query block i only needs keys [0, end of block i); the masked scores
    # past it contribute exactly 0, so skipping them changes nothing but the cost.
    outs = []
    for start in range(0, l, CAUSAL_BLOCK):
      end = min(l, start + CAUSAL_BLOCK)
      mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None]
      outs.append(attend(q_BxLxHxK[:, start:end], k_BxMxGxK[:, :end], v_BxMxGxV[:, :end], dt,
                         scale, jnp.broadcast_to(mask, (b, end - start, end))))
    return jnp.concatenate(outs, axis=1)
  q = q_BxLxHxK.reshape(b, l, g, h // g, kd)
  s = dot("blgrk,bmgk->bgrlm", q, k_BxMxGxK, dt) * scale
  if mask_BxLxM is None:
    mask = jnp.tril(jnp.ones((l, l), bool))
  else:
    mask = mask_BxLxM[:, None, None]
  s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  o = dot("bgrlm,bmgv->blgrv", p, v_BxMxGxV, dt)
  return o.reshape(b, l, h, v_BxMxGxV.shape[-1])


def cached_kv(module: nn.Module, k_BxLxGxK: jax.Array, v_BxLxGxV: jax.Array,
              dec: "Decoding", dt) -> tuple[jax.Array, jax.Array]:
  """Write this step's keys/values into `module`'s "cache" at dec.index; the full caches.

  The cache holds M = dec.valid_BxM.shape[1] slots per sequence in the
  compute dtype (what `attend` casts keys and values to anyway, so cached
  and full attention see the same numbers).
  """
  b, _, g, _ = k_BxLxGxK.shape
  m = dec.valid_BxM.shape[1]
  out = []
  for name, x in (("k", k_BxLxGxK), ("v", v_BxLxGxV)):
    c = module.variable("cache", name, jnp.zeros, (b, m, g, x.shape[-1]), dt)
    c.value = jax.lax.dynamic_update_slice(c.value, x.astype(dt), (0, dec.index, 0, 0))
    out.append(c.value)
  return out[0], out[1]


@flax.struct.dataclass
class Decoding:
  """What a cached forward pass over new tokens needs (moejax/inference/decode.py).

  The L new tokens sit at cache slots index..index+L-1 and RoPE positions
  `positions_BxL`; `valid_BxM` marks the cache slots that hold real tokens
  (False on left padding). Query slot i attends slot j iff j <= i and j is valid.
  """

  positions_BxL: jax.Array  # int32
  index: jax.Array  # int32 scalar: cache slot of the first new token
  valid_BxM: jax.Array  # bool [B, M]

  def mask(self, l: int) -> jax.Array:
    """bool [B, L, M]: which cache slots each new token attends."""
    m = self.valid_BxM.shape[1]
    q_L = self.index + jnp.arange(l)
    return (jnp.arange(m)[None, None, :] <= q_L[None, :, None]) & self.valid_BxM[:, None, :]


class CausalAttention(nn.Module):
  """Causal self-attention: multi-head or grouped-query, RoPE, optional biases and q/k norms.

  Parameters: with num_kv_heads == num_heads, w_qkv [D, 3, H, K] (b_qkv [3, H, K]
  with bias "qkv"/"qkvo"); with fewer KV heads, w_q [D, H, K] and w_kv
  [D, 2, Hkv, K] (b_q, b_kv); w_out [H, K, D] (b_out [D] with "qkvo").
  qk_norm "head" is an RMSNorm over each head's K dims (one gain [K] shared
  by the heads, Qwen3), "full" one over the whole projection ([H * K] for q,
  [Hkv * K] for k, OLMoE); both before RoPE.
  """

  num_heads: int
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  out_scale: float = 1.0
  num_kv_heads: int = 0  # 0: num_heads
  head_dim: int = 0  # 0: d_model / num_heads
  bias: str = "none"
  qk_norm: str = "none"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
               dec: Decoding | None = None) -> jax.Array:
    o_BxLxHxK = attention_heads(self, x_BxLxD, positions_BxL, dec)
    return output_projection(self, o_BxLxHxK, x_BxLxD.shape[-1])


def attention_heads(mod: CausalAttention, x_BxLxD: jax.Array, positions_BxL: jax.Array | None,
                    dec: Decoding | None) -> jax.Array:
  """The per-head outputs o [B, L, H, K] (float32) of `mod`'s attention, before w_out.

  Declares `mod`'s q/k/v parameters (and norms, and its cache when decoding);
  called from the compact `__call__` of `CausalAttention` or of a module that
  reweights the heads (moejax/model/head_experts.py).
  """
  b, l, d = x_BxLxD.shape
  h = mod.num_heads
  g = mod.num_kv_heads or h
  k = mod.head_dim or d // h
  dt = DTYPES[mod.dtype]
  in_bias = mod.bias in ("qkv", "qkvo")
  if g == h:
    w_qkv = mod.param("w_qkv", fan_in_init(d), (d, 3, h, k))
    qkv = linear(x_BxLxD, w_qkv.reshape(d, 3 * h * k), dt).reshape(b, l, 3, h, k)
    if in_bias:
      qkv = qkv + mod.param("b_qkv", nn.initializers.zeros, (3, h, k))
    q, kk, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  else:
    w_q = mod.param("w_q", fan_in_init(d), (d, h, k))
    w_kv = mod.param("w_kv", fan_in_init(d), (d, 2, g, k))
    q = linear(x_BxLxD, w_q.reshape(d, h * k), dt).reshape(b, l, h, k)
    kv = linear(x_BxLxD, w_kv.reshape(d, 2 * g * k), dt).reshape(b, l, 2, g, k)
    if in_bias:
      q = q + mod.param("b_q", nn.initializers.zeros, (h, k))
      kv = kv + mod.param("b_kv", nn.initializers.zeros, (2, g, k))
    kk, v = kv[:, :, 0], kv[:, :, 1]
  if mod.qk_norm == "head":
    q = RMSNorm(mod.norm_eps, name="q_norm")(q)
    kk = RMSNorm(mod.norm_eps, name="k_norm")(kk)
  elif mod.qk_norm == "full":
    q = RMSNorm(mod.norm_eps, name="q_norm")(q.reshape(b, l, h * k)).reshape(b, l, h, k)
    kk = RMSNorm(mod.norm_eps, name="k_norm")(kk.reshape(b, l, g * k)).reshape(b, l, g, k)
  if dec is not None:
    positions_BxL = dec.positions_BxL
  q = rope(q, mod.rope_theta, positions_BxL)
  kk = rope(kk, mod.rope_theta, positions_BxL)
  if dec is None:
    return attend(q, kk, v, dt)
  kk, v = cached_kv(mod, kk, v, dec, dt)
  return attend(q, kk, v, dt, mask_BxLxM=dec.mask(l))


def output_projection(mod: CausalAttention, o_BxLxHxK: jax.Array, d: int) -> jax.Array:
  """y = sum_h o[..., h, :] @ w_out[h] (+ b_out with bias "qkvo"): [B, L, D] float32."""
  b, l, h, k = o_BxLxHxK.shape
  w_out = mod.param("w_out", fan_in_init(h * k, mod.out_scale), (h, k, d))
  y = linear(o_BxLxHxK.reshape(b, l, h * k), w_out.reshape(h * k, d), DTYPES[mod.dtype])
  if mod.bias == "qkvo":
    y = y + mod.param("b_out", nn.initializers.zeros, (d,))
  return y


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
  def __call__(self, x_BxLxD: jax.Array, dec: Decoding | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
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
    pos = None if dec is None else dec.positions_BxL
    q = rope(q_BxLxExHxK.reshape(b, l, e * h, k), self.rope_theta, pos)
    kk = rope(kv_BxLxEx2xHxK[:, :, :, 0].reshape(b, l, e * h, k), self.rope_theta, pos)
    v = kv_BxLxEx2xHxK[:, :, :, 1].reshape(b, l, e * h, k)
    if dec is None:
      o = attend(q, kk, v, dt)
    else:
      kk, v = cached_kv(self, kk, v, dec, dt)
      o = attend(q, kk, v, dt, mask_BxLxM=dec.mask(l))
    x_TxD = x_BxLxD.reshape(b * l, d).astype(jnp.float32)
    logits_TxE = jnp.dot(x_TxD, w_DxE, precision="highest")
    combine_TxE, losses = attention_route(logits_TxE, self.top_k, self.renormalize)
    o_TxExHxK = o.reshape(b * l, e, h, k) * combine_TxE[:, :, None, None]
    y_TxD = linear(o_TxExHxK.reshape(b * l, e * h * k), w_out.reshape(e * h * k, d), dt)
    return y_TxD.reshape(b, l, d), losses
