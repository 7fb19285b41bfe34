"""Multi-head latent attention (MLA; DeepSeek-V2/V3): keys and values from a small latent.

`model.attention="mla"`, options under `model.mla`:
  q_lora_rank: 0 for a full-rank query projection w_q [D, H, Kqk]; else
      queries go through a latent of this width: w_q_a [D, r_q], RMSNorm,
      w_q_b [r_q, H, Kqk].
  kv_lora_rank: width r of the compressed KV latent c = RMSNorm(x w_kv_a[:, :r]).
  qk_nope_head_dim, qk_rope_head_dim: the query/key head splits into a part
      without position (keys from the latent: c w_kv_b[..., :nope]) and a
      RoPE part; the keys' RoPE part k_pe = x w_kv_a[:, r:] is one head shared
      by all heads (the "decoupled" RoPE key).
  v_head_dim: value head width (values from the latent: c w_kv_b[..., nope:]).
Kqk = nope + rope; scores are scaled by 1 / sqrt(Kqk); w_out [H, V, D].
`model.attn_bias="qkvo"` adds biases to w_q_a, w_kv_a and w_out (DeepSeek's
`attention_bias`; the full-rank w_q and the up-projections w_q_b, w_kv_b
have none, as in DeepSeek-V2/V3).

RoPE uses the rotate-half layout on the rope dims (first half, second half).
Checkpoints that store the rope dims interleaved (DeepSeek's
`rope_interleave`) are permuted to this layout on conversion; the scores are
unchanged because queries and keys get the same permutation. What a decoder
caches per token is the latent c and k_pe (r + rope numbers), not per-head
keys and values.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import DTYPES, RMSNorm, dot, fan_in_init, linear
from moejax.model.attention import Decoding, attend, rope


class LatentAttention(nn.Module):
  num_heads: int
  q_lora_rank: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  out_scale: float = 1.0
  bias: bool = False
  norm_eps: float = 1e-6

  def _proj(self, name: str, x: jax.Array, shape: tuple[int, ...], bias: bool) -> jax.Array:
    n_in = x.shape[-1]
    w = self.param(name, fan_in_init(n_in), (n_in,) + shape)
    y = linear(x, w.reshape(n_in, math.prod(shape)), DTYPES[self.dtype])
    y = y.reshape(x.shape[:-1] + shape)
    if bias:
      y = y + self.param("b" + name[1:], nn.initializers.zeros, shape)
    return y

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
               dec: Decoding | None = None) -> jax.Array:
    b, l, d = x_BxLxD.shape
    h, nope, rdim, vdim = (self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
                           self.v_head_dim)
    kqk = nope + rdim
    dt = DTYPES[self.dtype]
    if self.q_lora_rank:
      c_q = self._proj("w_q_a", x_BxLxD, (self.q_lora_rank,), self.bias)
      c_q = RMSNorm(self.norm_eps, name="q_a_norm")(c_q)
      q = self._proj("w_q_b", c_q, (h, kqk), False)
    else:
      q = self._proj("w_q", x_BxLxD, (h, kqk), False)
    if dec is not None:
      positions_BxL = dec.positions_BxL
    r = self.kv_lora_rank
    kv_a = self._proj("w_kv_a", x_BxLxD, (r + rdim,), self.bias)
    c_kv = RMSNorm(self.norm_eps, name="kv_a_norm")(kv_a[..., :r])
    k_pe = rope(kv_a[..., None, r:], self.rope_theta, positions_BxL)
    q_pe = rope(q[..., nope:], self.rope_theta, positions_BxL)
    if dec is None:
      kv = self._proj("w_kv_b", c_kv, (h, nope + vdim), False)
      q = jnp.concatenate([q[..., :nope].astype(q_pe.dtype), q_pe], axis=-1)
      k = jnp.concatenate(
          [kv[..., :nope].astype(k_pe.dtype), jnp.broadcast_to(k_pe, (b, l, h, rdim))], axis=-1)
      o = attend(q, k, kv[..., nope:], dt, scale=1.0 / math.sqrt(kqk))
    else:
      o = self._attend_latent(q[..., :nope], q_pe, c_kv, k_pe[:, :, 0], dec, dt)
    w_out = self.param("w_out", fan_in_init(h * vdim, self.out_scale), (h, vdim, d))
    y = linear(o.reshape(b, l, h * vdim), w_out.reshape(h * vdim, d), dt)
    if self.bias:
      y = y + self.param("b_out", nn.initializers.zeros, (d,))
    return y

  def _attend_latent(self, q_nope_BxLxHxN: jax.Array, q_pe_BxLxHxR: jax.Array,
                     c_BxLxC: jax.Array, k_pe_BxLxR: jax.Array, dec: Decoding, dt
                     ) -> jax.Array:
    """Cached attention over the latent: caches c [B, M, r] and k_pe [B, M, rope]."""
    b, l, h, nope = q_nope_BxLxHxN.shape
    r, m = c_BxLxC.shape[-1], dec.valid_BxM.shape[1]
    cache = []
    for name, x in (("c_kv", c_BxLxC), ("k_pe", k_pe_BxLxR)):
      var = self.variable("cache", name, jnp.zeros, (b, m, x.shape[-1]), dt)
      var.value = jax.lax.dynamic_update_slice(var.value, x.astype(dt), (0, dec.index, 0))
      cache.append(var.value)
    c_BxMxC, k_pe_BxMxR = cache
    w_kv_b = self.param("w_kv_b", fan_in_init(r), (r, h, nope + self.v_head_dim))
    q_lat_BxLxHxC = dot("blhn,chn->blhc", q_nope_BxLxHxN, w_kv_b[..., :nope], dt)
    s = (dot("blhc,bmc->bhlm", q_lat_BxLxHxC, c_BxMxC, dt)
         + dot("blhr,bmr->bhlm", q_pe_BxLxHxR, k_pe_BxMxR, dt))
    s = s / math.sqrt(nope + q_pe_BxLxHxR.shape[-1])
    s = jnp.where(dec.mask(l)[:, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    o_lat = dot("bhlm,bmc->blhc", p, c_BxMxC, dt)
    return dot("blhc,chv->blhv", o_lat, w_kv_b[..., nope:], dt)
