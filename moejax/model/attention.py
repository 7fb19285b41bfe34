"""Causal multi-head self-attention with rotary position embeddings."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import DTYPES, dot, fan_in_init, linear


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
    q = rope(qkv[:, :, 0], self.rope_theta)
    kk = rope(qkv[:, :, 1], self.rope_theta)
    v = qkv[:, :, 2]
    s_BxHxLxL = dot("blhk,bmhk->bhlm", q, kk, dt) / math.sqrt(k)
    causal_LxL = jnp.tril(jnp.ones((l, l), bool))
    s_BxHxLxL = jnp.where(causal_LxL, s_BxHxLxL, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s_BxHxLxL, axis=-1)
    o_BxLxHxK = dot("bhlm,bmhk->blhk", p, v, dt)
    return linear(o_BxLxHxK.reshape(b, l, h * k), w_out.reshape(h * k, d), dt)
