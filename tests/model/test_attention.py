"""RoPE and attention (multi-head, grouped-query, biases, q/k norms) against slow NumPy
references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.model.attention import CausalAttention, rope
from tests.model.params import apply_jit, random_params


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


# --- grouped-query attention, head_dim, biases, q/k norms, positions ---------------------

def _rope_at(x, theta, pos_BxL):
  """Rotate-half RoPE of x [B, L, H, K] at explicit positions [B, L] (float64 loops)."""
  b, l, h, k = x.shape
  half = k // 2
  out = np.zeros(x.shape, np.float64)
  for bi in range(b):
    for t in range(l):
      for i in range(half):
        a = float(pos_BxL[bi, t]) * theta ** (-i / half)
        c, s = np.cos(a), np.sin(a)
        x1, x2 = x[bi, t, :, i], x[bi, t, :, i + half]
        out[bi, t, :, i] = x1 * c - x2 * s
        out[bi, t, :, i + half] = x2 * c + x1 * s
  return out


def _rms_ref(x, gain, eps):
  """RMSNorm over the last axis."""
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(gain, np.float64)


def _softmax_attention_ref(q, k, v, scale):
  """Causal attention, q [B, L, H, K] over k, v [B, L, H, *] with H heads each (loops)."""
  b, l, h, _ = q.shape
  out = np.zeros((b, l, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      for t in range(l):
        s = np.array([q[bi, t, hi] @ k[bi, u, hi] for u in range(t + 1)]) * scale
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, t, hi] = sum(p[u] * v[bi, u, hi] for u in range(t + 1))
  return out


def _causal_attention_ref(p, x, h, g, kd, bias, qk_norm, eps=1e-6, theta=1e4, pos=None):
  """CausalAttention in NumPy: separate q / kv projections, kv heads *repeated* H/G times."""
  p = {n: (np.asarray(v, np.float64) if not isinstance(v, dict)
           else {m: np.asarray(w, np.float64) for m, w in v.items()}) for n, v in p.items()}
  x = np.asarray(x, np.float64)
  b, l, _ = x.shape
  if g == h:
    qkv = np.einsum("bld,dthk->tblhk", x, p["w_qkv"])
    if bias != "none":
      qkv = qkv + p["b_qkv"][:, None, None]
    q, k, v = qkv
  else:
    q = np.einsum("bld,dhk->blhk", x, p["w_q"])
    kv = np.einsum("bld,dtgk->tblgk", x, p["w_kv"])
    if bias != "none":
      q = q + p["b_q"]
      kv = kv + p["b_kv"][:, None, None]
    k, v = kv
  if qk_norm == "head":
    q, k = _rms_ref(q, p["q_norm"]["scale"], eps), _rms_ref(k, p["k_norm"]["scale"], eps)
  elif qk_norm == "full":
    q = _rms_ref(q.reshape(b, l, h * kd), p["q_norm"]["scale"], eps).reshape(b, l, h, kd)
    k = _rms_ref(k.reshape(b, l, g * kd), p["k_norm"]["scale"], eps).reshape(b, l, g, kd)
  pos = np.broadcast_to(np.arange(l), (b, l)) if pos is None else pos
  q, k = _rope_at(q, theta, pos), _rope_at(k, theta, pos)
  k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)  # head i reads kv i // r
  o = _softmax_attention_ref(q, k, v, 1.0 / np.sqrt(kd))
  y = np.einsum("blhk,hkd->bld", o, p["w_out"])
  return y + p["b_out"] if bias == "qkvo" else y


_rope = jax.jit(rope, static_argnums=1)


ATTN_CASES = [  # (H, G = num_kv_heads, head_dim, attn_bias, qk_norm)
    (4, 2, 0, "none", "none"),  # GQA, K = D / H
    (4, 1, 0, "qkv", "none"),  # MQA
    (2, 2, 6, "qkv", "head"),  # head_dim != D / H, Qwen3-style norms
    (4, 2, 4, "qkvo", "full"),  # OLMoE-style norms over whole projections, GQA
    (2, 0, 0, "qkvo", "full"),  # multi-head (G = H, the fused w_qkv) with every option
    (4, 4, 6, "none", "head"),  # num_kv_heads == num_heads: the fused w_qkv too
]


def _module(h, g, kd, bias, qk_norm):
  return CausalAttention(num_heads=h, rope_theta=1e4, num_kv_heads=g, head_dim=kd, bias=bias,
                         qk_norm=qk_norm)


@pytest.mark.parametrize("h,g,kd,bias,qk_norm", ATTN_CASES)
def test_attention_options_match_reference(h, g, kd, bias, qk_norm):
  b, l, d = 2, 5, 8
  mod = _module(h, g, kd, bias, qk_norm)
  x = np.random.default_rng(2).normal(size=(b, l, d)).astype(np.float32)
  params = random_params(mod, x, h * 10 + g)
  out = apply_jit(mod, params, x)
  gg, kk = g or h, kd or d // h
  ref = _causal_attention_ref(params, x, h, gg, kk, bias, qk_norm)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("h,g,kd,bias,qk_norm", ATTN_CASES)
def test_attention_param_shapes(h, g, kd, bias, qk_norm):
  d = 8
  mod = _module(h, g, kd, bias, qk_norm)
  shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(
      mod.init, jax.random.key(0), jnp.zeros((1, 3, d)))["params"])
  gg, k = g or h, kd or d // h
  want = {"w_out": (h, k, d)}
  if gg == h:
    want["w_qkv"] = (d, 3, h, k)
    if bias != "none":
      want["b_qkv"] = (3, h, k)
  else:
    want.update(w_q=(d, h, k), w_kv=(d, 2, gg, k))
    if bias != "none":
      want.update(b_q=(h, k), b_kv=(2, gg, k))
  if bias == "qkvo":
    want["b_out"] = (d,)
  if qk_norm == "head":
    want.update(q_norm={"scale": (k,)}, k_norm={"scale": (k,)})
  elif qk_norm == "full":
    want.update(q_norm={"scale": (h * k,)}, k_norm={"scale": (gg * k,)})
  assert shapes == want


def test_biases_are_used():
  """b_out shifts every output by itself; q/k/v biases change the output."""
  b, l, d, h = 1, 4, 8, 4
  x = np.random.default_rng(3).normal(size=(b, l, d)).astype(np.float32)
  mod = _module(h, 2, 0, "qkvo", "none")
  params = random_params(mod, x, 3)
  y0 = apply_jit(mod, params, x)
  shift = np.arange(d, dtype=np.float32)
  y1 = apply_jit(mod, {**params, "b_out": params["b_out"] + shift}, x)
  np.testing.assert_allclose(y1, y0 + shift, rtol=1e-5, atol=1e-5)
  for name in ("b_q", "b_kv"):
    p = {**params, name: params[name] + 1.0}
    assert not np.allclose(apply_jit(mod, p, x), y0), name


def test_head_norm_is_per_head_and_full_norm_is_not():
  """Scaling one head's query weights: invisible under "head" norm, visible under "full"."""
  b, l, d, h = 1, 4, 8, 2
  x = np.random.default_rng(4).normal(size=(b, l, d)).astype(np.float32)
  for qk_norm, invariant in (("head", True), ("full", False), ("none", False)):
    mod = _module(h, 1, 0, "none", qk_norm)
    params = random_params(mod, x, 4)
    w_q = np.asarray(params["w_q"]).copy()
    w_q[:, 0] *= 3.0
    y0 = apply_jit(mod, params, x)
    y1 = apply_jit(mod, {**params, "w_q": w_q}, x)
    assert np.allclose(y0, y1, rtol=1e-4, atol=1e-5) == invariant, qk_norm


@settings(derandomize=True, deadline=None, max_examples=10)
@given(l=st.integers(1, 6), half=st.integers(1, 3), offset=st.integers(0, 50))
def test_rope_at_explicit_positions(l, half, offset):
  """rope(x, positions) matches the reference there; positions 0..L-1 are the default."""
  rng = np.random.default_rng(l * 100 + half * 10 + offset)
  x = rng.normal(size=(2, l, 2, 2 * half)).astype(np.float32)
  pos = offset + np.stack([np.arange(l), rng.permutation(l)])  # [B, L], any order
  np.testing.assert_allclose(np.asarray(_rope(x, 100.0, jnp.asarray(pos))),
                             _rope_at(x, 100.0, pos), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(_rope(x, 100.0, jnp.arange(l)[None])),
                             np.asarray(_rope(x, 100.0)), rtol=1e-6, atol=1e-6)


@settings(derandomize=True, deadline=None, max_examples=12)
@given(shift=st.integers(-200, 200), l=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_rope_scores_invariant_to_shifting_positions(shift, l, seed):
  """Relative positions: q.k after RoPE is unchanged when every position moves by `shift`."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(1, l, 2, 8)).astype(np.float32)
  k = rng.normal(size=(1, l, 2, 8)).astype(np.float32)
  pos = np.sort(rng.choice(1000, size=l, replace=False))[None] + 300
  scores = lambda p: np.einsum("blhk,bmhk->bhlm", np.asarray(_rope(q, 1e4, jnp.asarray(p))),
                               np.asarray(_rope(k, 1e4, jnp.asarray(p))))
  np.testing.assert_allclose(scores(pos + shift), scores(pos), rtol=1e-3, atol=1e-3)


@settings(derandomize=True, deadline=None, max_examples=5)
@given(shift=st.integers(1, 100))
def test_attention_invariant_to_shifting_positions(shift):
  """The layer's output depends on positions only through their differences."""
  b, l, d = 2, 4, 8
  mod = _module(4, 2, 0, "qkv", "head")
  x = np.random.default_rng(5).normal(size=(b, l, d)).astype(np.float32)
  params = random_params(mod, x, 5)
  pos = np.broadcast_to(np.arange(l), (b, l))
  y0 = apply_jit(mod, params, x)
  y1 = apply_jit(mod, params, x, jnp.asarray(pos + shift))
  np.testing.assert_allclose(y1, y0, rtol=1e-3, atol=1e-4)
  ref = _causal_attention_ref(params, x, 4, 2, 2, "qkv", "head", pos=pos + shift)
  np.testing.assert_allclose(y1, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("h,g,kd,bias,qk_norm", ATTN_CASES[:4])
def test_attention_is_causal(h, g, kd, bias, qk_norm):
  """Outputs at positions <= t ignore inputs after t, and do see earlier ones."""
  b, l, d, t = 2, 6, 8, 2
  mod = _module(h, g, kd, bias, qk_norm)
  x = np.random.default_rng(6).normal(size=(b, l, d)).astype(np.float32)
  params = random_params(mod, x, 6)
  x2 = x.copy()
  x2[:, t + 1:] += 1.0
  y, y2 = (apply_jit(mod, params, v) for v in (x, x2))
  np.testing.assert_array_equal(y[:, :t + 1], y2[:, :t + 1])
  assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("l", [256, 300])  # two full query blocks; a ragged last block
def test_blockwise_causal_attention_equals_a_float64_softmax(l):
  from moejax.model import attention as attn  # noqa: PLC0415
  assert l >= 2 * attn.CAUSAL_BLOCK  # the block-by-block path is the one under test
  rng = np.random.default_rng(0)
  b, h, g, k = 1, 4, 2, 8
  q = rng.normal(size=(b, l, h, k)).astype(np.float32)
  kk = rng.normal(size=(b, l, g, k)).astype(np.float32)
  v = rng.normal(size=(b, l, g, k)).astype(np.float32)
  got = np.asarray(jax.jit(lambda *a: attn.attend(*a, jnp.float32))(q, kk, v))
  s = np.einsum("blgrk,bmgk->bgrlm", q.reshape(b, l, g, h // g, k).astype(np.float64),
                kk.astype(np.float64)) / np.sqrt(k)
  s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bgrlm,bmgv->blgrv", p, v.astype(np.float64)).reshape(b, l, h, k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
