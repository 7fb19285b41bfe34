"""Soft MoE / Mixture of Tokens: weights, soft dispatch vs NumPy, layer, causality."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax import model as lm
from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe.dispatch.soft import soft_dispatch
from moejax.moe.routers.soft import batch_groups, soft_route
from moejax.moe.types import SoftAssignment
from tests.conftest import tiny_config

from . import reference as ref

L3 = math.log(3.0)


def test_hand_computed_case():
  # One group of two tokens, two slots: softmax over tokens / over slots.
  a = soft_route(jnp.array([[0.0, L3], [L3, 0.0]]), jnp.array([[0, 1]]))
  np.testing.assert_allclose(a.dispatch[0], [[0.25, 0.75], [0.75, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(a.combine[0], [[0.25, 0.75], [0.75, 0.25]], rtol=1e-6)
  # Tokens of one position across the batch form a group: t = b * L + l.
  np.testing.assert_array_equal(batch_groups(2, 3), [[0, 3], [1, 4], [2, 5]])


def test_weights_sum_to_one():
  logits = 3.0 * jax.random.normal(jax.random.key(0), (12, 6))
  a = soft_route(logits, batch_groups(4, 3))
  assert a.dispatch.shape == a.combine.shape == (3, 4, 6)
  np.testing.assert_allclose(jnp.sum(a.dispatch, axis=1), 1.0, rtol=1e-5)  # per slot
  np.testing.assert_allclose(jnp.sum(a.combine, axis=2), 1.0, rtol=1e-5)  # per token
  assert bool(jnp.all(a.dispatch >= 0)) and bool(jnp.all(a.combine >= 0))


def _np_soft(x, token, dispatch, combine, w, spe):
  """Loop reference: slots mix their group's tokens, experts, mix back."""
  g, m, s = dispatch.shape
  y = np.zeros_like(x)
  for gi in range(g):
    for si in range(s):
      e = si // spe
      xs = sum(dispatch[gi, mi, si] * x[token[gi, mi]] for mi in range(m))
      ys = ref.swiglu(xs, w["w_gate"][e], w["w_up"][e], w["w_down"][e])
      for mi in range(m):
        y[token[gi, mi]] += combine[gi, mi, si] * ys
  return y


@pytest.mark.parametrize("b,l,e,spe", [(2, 3, 2, 2), (3, 2, 3, 1), (1, 4, 2, 2)])
def test_soft_dispatch_matches_numpy(b, l, e, spe):
  rng = np.random.default_rng(b * 100 + l * 10 + e)
  d, f = 5, 7
  t = b * l
  x = rng.standard_normal((t, d))
  w = ref.random_expert_weights(rng, e, d, f)
  a = soft_route(jnp.asarray(2.0 * rng.standard_normal((t, e * spe)), jnp.float32),
                 batch_groups(b, l))
  y, stats = jax.jit(soft_dispatch)(jnp.asarray(x, jnp.float32), a,
                                     ref.swiglu_experts(w, jnp.float32))
  want = _np_soft(x, np.asarray(a.token), np.asarray(a.dispatch, np.float64),
                  np.asarray(a.combine, np.float64), w, spe)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert float(stats["dropped_fraction"]) == 0.0
  if b == 1:  # one token per group: every slot takes it whole
    np.testing.assert_array_equal(a.dispatch, 1.0)


def _cfg(dispatch):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = "soft", 2, 1, 8, dispatch
  c.soft.slots_per_expert = 2
  return ml_collections.FrozenConfigDict(c)


def test_layer_uses_soft_dispatch_whatever_moe_dispatch():
  cfg = _cfg("capacity")  # ignored (the contract test runs every dispatcher)
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  variables = layer.init(jax.random.key(1), x)
  p = variables["params"]
  assert p["router"]["phi"].shape == (4, 4) and p["router"]["scale"].shape == ()
  y, aux, _ = jax.jit(layer.apply)(variables, x)
  # Recompute the routing by hand and apply the NumPy reference.
  xf = np.asarray(x, np.float64).reshape(6, 4)
  xn = xf / np.sqrt((xf ** 2).sum(-1, keepdims=True) + 1e-6)
  phi = np.asarray(p["router"]["phi"], np.float64)
  phin = phi / np.sqrt((phi ** 2).sum(0, keepdims=True) + 1e-6)
  a = soft_route(jnp.asarray(xn @ phin, jnp.float32), batch_groups(2, 3))
  w = jax.tree.map(lambda v: np.asarray(v, np.float64), p["experts"])
  want = _np_soft(xf, np.asarray(a.token), np.asarray(a.dispatch, np.float64),
                  np.asarray(a.combine, np.float64), w, 2)
  np.testing.assert_allclose(np.asarray(y).reshape(6, 4), want, rtol=1e-4, atol=1e-5)
  m = aux["metrics"]
  np.testing.assert_allclose(m["load"], [0.5, 0.5])
  assert float(m["load_cv"]) == 0.0 and float(m["experts_per_token"]) == 2.0
  assert float(m["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(aux["losses"]["load_balance"], 1.0, rtol=1e-5)
  assert 0.5 <= float(m["top1_prob"]) <= 1.0


def test_batch_size_one_is_a_per_token_dense_mixture():
  """B = 1: every slot takes the single token of its position (documented)."""
  cfg = _cfg("dense")
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 3, 4))
  variables = layer.init(jax.random.key(1), x)
  apply = jax.jit(layer.apply)
  y_all, _, _ = apply(variables, x)
  for i in range(3):  # each position on its own gives the same output
    y_i, _, _ = apply(variables, x[:, i:i + 1])
    np.testing.assert_allclose(y_all[:, i], y_i[:, 0], rtol=1e-5, atol=1e-6)


def test_causal_in_decoder_and_mixes_across_batch():
  cfg = tiny_config(router="soft")
  variables = lm.init(jax.random.key(1), cfg)
  ids = jax.random.randint(jax.random.key(0), (2, cfg.train.seq_len), 0, 256)
  t = 6
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  a, b = lm.apply(variables, ids, cfg)[0], lm.apply(variables, ids2, cfg)[0]
  np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
  # Mixture of Tokens: sequence 0's outputs depend on sequence 1 (same positions).
  ids3 = ids.at[1].set((ids[1] + 5) % 256)
  c = lm.apply(variables, ids3, cfg)[0]
  assert not np.allclose(a[0], c[0])


def test_soft_assignment_shapes():
  a = soft_route(jnp.zeros((6, 4)), batch_groups(3, 2))
  assert isinstance(a, SoftAssignment)
  assert a.token.dtype == jnp.int32 and a.token.shape == (2, 3)
  assert a.dispatch.dtype == a.combine.dtype == jnp.float32
  np.testing.assert_allclose(a.dispatch, 1 / 3)  # equal logits: uniform
  np.testing.assert_allclose(a.combine, 1 / 4)
