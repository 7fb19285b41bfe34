"""Multi-head latent attention (DeepSeek-V2/V3 MLA) against a slow NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.model.latent_attention import LatentAttention
from tests.model.params import apply_jit, random_params

THETA, EPS = 1e4, 1e-6
D = 8


def _rope_ref(x, pos_BxL):
  """Rotate-half RoPE of x [B, L, H, K] at positions [B, L] (float64 loops)."""
  b, l, _, k = x.shape
  half = k // 2
  out = np.zeros(x.shape, np.float64)
  for bi in range(b):
    for t in range(l):
      for i in range(half):
        a = float(pos_BxL[bi, t]) * THETA ** (-i / half)
        c, s = np.cos(a), np.sin(a)
        x1, x2 = x[bi, t, :, i], x[bi, t, :, i + half]
        out[bi, t, :, i] = x1 * c - x2 * s
        out[bi, t, :, i + half] = x2 * c + x1 * s
  return out


def _rms(x, gain):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * gain


def _mla_ref(p, x, h, q_rank, kv_rank, nope, rdim, vdim, bias, pos=None):
  """MLA written out token by token, head by head.

  q = (RMSNorm(x W_qa + b_qa) W_qb) or x W_q, split into [nope | rope] per head;
  [c | k_pe] = x W_kva + b_kva; c = RMSNorm(c); [k_nope | v] = c W_kvb per head;
  k_pe is ONE rope head shared by every head; score = (q_nope.k_nope + rope(q_pe).rope(k_pe))
  / sqrt(nope + rope); out = sum_h softmax(score) v_h W_o[h] + b_o.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, l, _ = x.shape
  pos = np.broadcast_to(np.arange(l), (b, l)) if pos is None else pos
  if q_rank:
    cq = x @ p["w_q_a"] + (p["b_q_a"] if bias else 0.0)
    q = np.einsum("blr,rhk->blhk", _rms(cq, p["q_a_norm"]["scale"]), p["w_q_b"])
  else:
    q = np.einsum("bld,dhk->blhk", x, p["w_q"])
  kv_a = x @ p["w_kv_a"] + (p["b_kv_a"] if bias else 0.0)
  c = _rms(kv_a[..., :kv_rank], p["kv_a_norm"]["scale"])
  k_pe = _rope_ref(kv_a[..., kv_rank:][:, :, None, :], pos)[:, :, 0]  # [B, L, rope]
  kv = np.einsum("blr,rhk->blhk", c, p["w_kv_b"])
  k_nope, v = kv[..., :nope], kv[..., nope:]
  q_nope, q_pe = q[..., :nope], _rope_ref(q[..., nope:], pos)
  y = np.zeros((b, l, D))
  for bi in range(b):
    for hi in range(h):
      for t in range(l):
        s = np.array([q_nope[bi, t, hi] @ k_nope[bi, u, hi] + q_pe[bi, t, hi] @ k_pe[bi, u]
                      for u in range(t + 1)]) / np.sqrt(nope + rdim)
        w = np.exp(s - s.max())
        w /= w.sum()
        o = sum(w[u] * v[bi, u, hi] for u in range(t + 1))
        y[bi, t] += o @ p["w_out"][hi]
  return y + (p["b_out"] if bias else 0.0)


def _module(h, q_rank, kv_rank, nope, rdim, vdim, bias):
  return LatentAttention(h, q_rank, kv_rank, nope, rdim, vdim, THETA, bias=bias, norm_eps=EPS)


CASES = [  # (H, q_lora_rank, kv_lora_rank, nope, rope, v, bias)
    (2, 0, 6, 4, 2, 4, False),  # full-rank queries (DeepSeek-V2-Lite)
    (2, 6, 4, 2, 4, 6, True),  # low-rank queries with norm, biases, v != nope + rope
    (3, 4, 5, 6, 2, 2, False),  # odd head count, wide nope part
]


@pytest.mark.parametrize("h,q_rank,kv_rank,nope,rdim,vdim,bias", CASES)
def test_mla_matches_reference(h, q_rank, kv_rank, nope, rdim, vdim, bias):
  x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
  mod = _module(h, q_rank, kv_rank, nope, rdim, vdim, bias)
  params = random_params(mod, x, h + q_rank)
  ref = _mla_ref(params, x, h, q_rank, kv_rank, nope, rdim, vdim, bias)
  np.testing.assert_allclose(apply_jit(mod, params, x), ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("h,q_rank,kv_rank,nope,rdim,vdim,bias", CASES)
def test_mla_param_shapes(h, q_rank, kv_rank, nope, rdim, vdim, bias):
  mod = _module(h, q_rank, kv_rank, nope, rdim, vdim, bias)
  shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(
      mod.init, jax.random.key(0), jnp.zeros((1, 3, D)))["params"])
  want = {"w_kv_a": (D, kv_rank + rdim), "kv_a_norm": {"scale": (kv_rank,)},
          "w_kv_b": (kv_rank, h, nope + vdim), "w_out": (h, vdim, D)}
  if q_rank:
    want.update(w_q_a=(D, q_rank), q_a_norm={"scale": (q_rank,)},
                w_q_b=(q_rank, h, nope + rdim))
  else:
    want["w_q"] = (D, h, nope + rdim)
  if bias:  # DeepSeek's attention_bias: the down projections and the output only
    want.update(b_kv_a=(kv_rank + rdim,), b_out=(D,))
    if q_rank:
      want["b_q_a"] = (q_rank,)
  assert shapes == want


def test_full_rank_queries_have_no_bias():
  """As in DeepSeek-V2/V3, the full-rank q projection has no bias even with attention_bias."""
  mod = _module(2, 0, 4, 2, 2, 2, True)
  shapes = jax.eval_shape(mod.init, jax.random.key(0), jnp.zeros((1, 3, D)))["params"]
  assert "b_q" not in shapes and "b_kv_a" in shapes and "b_out" in shapes


def test_nope_keys_per_head_rope_key_shared():
  """The nope keys are per head (w_kv_b's head axis): head 1's leave head 0's output alone.
  The rope key is one [D, rope] slice of w_kv_a that every head reads: it moves both."""
  h, nope, rdim, vdim, r = 2, 2, 2, 4, 4
  mod = _module(h, 0, r, nope, rdim, vdim, False)
  x = np.random.default_rng(2).normal(size=(1, 4, D)).astype(np.float32)
  params = random_params(mod, x, 9)

  def head_out(p, head):  # the layer's output with every other head's w_out zeroed
    w_out = np.zeros(np.shape(params["w_out"]), np.float32)
    w_out[head] = params["w_out"][head]
    return apply_jit(mod, {**p, "w_out": w_out}, x)

  w_kv_b = np.asarray(params["w_kv_b"]).copy()
  w_kv_b[:, 1, :nope] *= 3.0
  np.testing.assert_allclose(head_out({**params, "w_kv_b": w_kv_b}, 0), head_out(params, 0),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(head_out({**params, "w_kv_b": w_kv_b}, 1), head_out(params, 1))
  w_kv_a = np.asarray(params["w_kv_a"]).copy()
  w_kv_a[:, r:] *= 3.0  # the shared rope key
  for head in range(h):
    assert not np.allclose(head_out({**params, "w_kv_a": w_kv_a}, head),
                           head_out(params, head)), head


@pytest.mark.parametrize("q_rank", [0, 4])
def test_mla_is_causal(q_rank):
  b, l, t = 2, 6, 2
  mod = _module(2, q_rank, 4, 2, 2, 4, True)
  x = np.random.default_rng(3).normal(size=(b, l, D)).astype(np.float32)
  params = random_params(mod, x, 3)
  x2 = x.copy()
  x2[:, t + 1:] -= 1.0
  y, y2 = apply_jit(mod, params, x), apply_jit(mod, params, x2)
  np.testing.assert_array_equal(y[:, :t + 1], y2[:, :t + 1])
  assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


@settings(derandomize=True, deadline=None, max_examples=5)
@given(shift=st.integers(1, 100))
def test_mla_invariant_to_shifting_positions(shift):
  """Only the decoupled rope part sees positions, through their differences."""
  b, l = 2, 4
  mod = _module(2, 4, 4, 2, 4, 2, False)
  x = np.random.default_rng(4).normal(size=(b, l, D)).astype(np.float32)
  params = random_params(mod, x, 4)
  pos = np.broadcast_to(np.arange(l), (b, l)) + shift
  y = apply_jit(mod, params, x, jnp.asarray(pos))
  np.testing.assert_allclose(y, apply_jit(mod, params, x), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(y, _mla_ref(params, x, 2, 4, 4, 2, 4, 2, False, pos),
                             rtol=1e-3, atol=1e-4)
