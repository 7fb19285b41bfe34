"""RoPE and attention against slow NumPy references."""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import given, settings, strategies as st

from moejax.model.attention import CausalAttention, rope


def _rope_ref(x, theta):
  b, l, h, k = x.shape
  half = k // 2
  out = np.zeros_like(x, dtype=np.float64)
  for pos in range(l):
    for i in range(half):
      a = pos * theta ** (-i / half)
      c, s = np.cos(a), np.sin(a)
      x1, x2 = x[:, pos, :, i], x[:, pos, :, i + half]
      out[:, pos, :, i] = x1 * c - x2 * s
      out[:, pos, :, i + half] = x2 * c + x1 * s
  return out


@settings(derandomize=True, deadline=None, max_examples=10)
@given(l=st.integers(1, 9), half=st.integers(1, 4))
def test_rope_matches_reference(l, half):
  x = np.random.default_rng(l * 10 + half).normal(size=(2, l, 3, 2 * half)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(rope(x, 100.0)), _rope_ref(x, 100.0),
                             rtol=1e-4, atol=1e-5)


def test_rope_relative():
  """q.k after RoPE depends only on the position difference."""
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(1, 1, 1, 8)), rng.normal(size=(1, 1, 1, 8))
  tile = lambda v: np.repeat(v, 6, axis=1).astype(np.float32)
  rq, rk = np.asarray(rope(tile(q), 1e4)), np.asarray(rope(tile(k), 1e4))
  d1 = np.sum(rq[0, 3, 0] * rk[0, 1, 0])
  d2 = np.sum(rq[0, 5, 0] * rk[0, 3, 0])
  np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_attention_matches_reference():
  b, l, d, h = 2, 5, 8, 2
  mod = CausalAttention(num_heads=h, rope_theta=1e4)
  x = np.random.default_rng(1).normal(size=(b, l, d)).astype(np.float32)
  params = mod.init(jax.random.key(0), x)["params"]
  out = np.asarray(mod.apply({"params": params}, x))
  wqkv, wo = np.asarray(params["w_qkv"], np.float64), np.asarray(params["w_out"], np.float64)
  qkv = np.einsum("bld,dthk->tblhk", x, wqkv)
  q, k, v = _rope_ref(qkv[0], 1e4), _rope_ref(qkv[1], 1e4), qkv[2]
  ref = np.zeros((b, l, d))
  for bi in range(b):
    for hi in range(h):
      for t in range(l):
        s = np.array([q[bi, t, hi] @ k[bi, u, hi] for u in range(t + 1)]) / np.sqrt(d // h)
        p = np.exp(s - s.max())
        p /= p.sum()
        o = sum(p[u] * v[bi, u, hi] for u in range(t + 1))
        ref[bi, t] += o @ wo[hi]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
