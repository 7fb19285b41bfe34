"""`topk_route` and `TopKRouter` against the NumPy reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.config import default_config
from moejax.moe.routers.topk import TopKRouter, topk_route

from . import reference as ref

ORDERS = ("softmax_topk", "topk_softmax")


@functools.lru_cache(maxsize=None)
def _route_fn(k, order, renormalize):
  return jax.jit(functools.partial(topk_route, k=k, order=order,
                                   renormalize=renormalize))


def _check_route(logits, k, order, renormalize):
  a, probs = _route_fn(k, order, renormalize)(jnp.asarray(logits))
  tok, exp, wt, p = ref.topk_route(logits, k, order, renormalize)
  t = logits.shape[0]
  assert a.num_slots == t * k
  for arr, dt in ((a.token, jnp.int32), (a.expert, jnp.int32),
                  (a.weight, jnp.float32), (a.valid, jnp.bool_)):
    assert arr.shape == (t * k,) and arr.dtype == dt
  np.testing.assert_array_equal(np.asarray(a.token), tok)
  np.testing.assert_array_equal(np.asarray(a.expert), exp)
  np.testing.assert_allclose(np.asarray(a.weight), wt, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(a.valid))
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5, atol=1e-7)


# (T, E, k): k = 1, k = E, E = 1, T = 1 and T / E / k sharing no factor.
SHAPES = [(1, 1, 1), (13, 5, 2), (7, 4, 4), (16, 8, 3), (11, 3, 1)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("t,e,k", SHAPES)
def test_topk_route_matches_numpy(order, renormalize, t, e, k):
  rng = np.random.default_rng(t * 100 + e * 10 + k)
  logits = (2.0 * rng.standard_normal((t, e))).astype(np.float32)
  _check_route(logits, k, order, renormalize)


# The shapes above (compiled once); hypothesis varies values and scales,
# including near-ties from coarse rounding.
@settings(derandomize=True, deadline=None, max_examples=25)
@given(shape=st.sampled_from(SHAPES), order=st.sampled_from(ORDERS),
       renormalize=st.booleans(), scale=st.sampled_from([0.1, 1.0, 8.0]),
       rounded=st.booleans(), seed=st.integers(0, 2**16))
def test_topk_route_hypothesis(shape, order, renormalize, scale, rounded, seed):
  t, e, k = shape
  logits = scale * np.random.default_rng(seed).standard_normal((t, e))
  if rounded:  # exact ties between experts within a token
    # (+ 0.0 turns -0.0 into 0.0: lax.top_k orders -0.0 below 0.0, so on the
    # logits those are not ties, although their softmax weights are equal.)
    logits = np.round(logits) + 0.0
  _check_route(logits.astype(np.float32), k, order, renormalize)


def test_slot_layout_is_choice_major():
  # Token t prefers expert (t mod 3), then expert (t + 1) mod 3.
  t, e, k = 5, 3, 2
  logits = np.full((t, e), -5.0, np.float32)
  for i in range(t):
    logits[i, i % 3] = 3.0
    logits[i, (i + 1) % 3] = 1.0
  a, _ = topk_route(jnp.asarray(logits), k)
  # slot c*T + t is token t's c-th choice.
  np.testing.assert_array_equal(np.asarray(a.token), [0, 1, 2, 3, 4] * 2)
  np.testing.assert_array_equal(np.asarray(a.expert),
                                [0, 1, 2, 0, 1] + [1, 2, 0, 1, 2])
  w = np.asarray(a.weight)
  assert np.all(w[:t] > w[t:])  # first choices carry the larger weight


@pytest.mark.parametrize("order", ORDERS)
def test_ties_go_to_lower_expert_index(order):
  logits = np.array([[1.0, 1.0, 1.0, 1.0],     # all tied
                     [0.0, 2.0, 2.0, -1.0],    # tie between 1 and 2
                     [3.0, 1.0, 3.0, 3.0],     # three-way tie, pick 0 and 2
                     [-1.0, 0.5, 0.5, 0.5]],   # tie for first, pick 1 and 2
                    np.float32)
  a, _ = topk_route(jnp.asarray(logits), 2, order, renormalize=False)
  np.testing.assert_array_equal(np.asarray(a.expert).reshape(2, 4).T,
                                [[0, 1], [1, 2], [0, 2], [1, 2]])
  w = np.asarray(a.weight).reshape(2, 4).T
  np.testing.assert_allclose(w[:, 0], w[:, 1], rtol=1e-6)  # tied weights equal
  if order == "topk_softmax":
    np.testing.assert_allclose(w, 0.5, rtol=1e-6)
  else:
    np.testing.assert_allclose(w[0], 0.25, rtol=1e-6)
  _check_route(logits, 2, order, False)
  _check_route(logits, 3, order, True)


def test_renormalize_sums_to_one_and_topk_softmax_ignores_it():
  logits = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
  for order in ORDERS:
    a, _ = topk_route(jnp.asarray(logits), 3, order, renormalize=True)
    np.testing.assert_allclose(np.asarray(a.weight).reshape(3, 9).sum(0), 1.0,
                               rtol=1e-6)
  a0, _ = topk_route(jnp.asarray(logits), 3, "softmax_topk", renormalize=False)
  assert np.all(np.asarray(a0.weight).reshape(3, 9).sum(0) < 1.0)
  a1, _ = topk_route(jnp.asarray(logits), 3, "topk_softmax", renormalize=False)
  a2, _ = topk_route(jnp.asarray(logits), 3, "topk_softmax", renormalize=True)
  np.testing.assert_array_equal(np.asarray(a1.weight), np.asarray(a2.weight))


def test_bad_order_raises():
  with pytest.raises(ValueError, match="order"):
    topk_route(jnp.zeros((2, 2)), 1, order="nope")


def test_bfloat16_logits_are_routed_in_float32():
  logits = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
  a, probs = topk_route(jnp.asarray(logits, jnp.bfloat16), 2)
  assert probs.dtype == jnp.float32 and a.weight.dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  tok, exp, wt, p = ref.topk_route(rounded, 2)
  np.testing.assert_array_equal(np.asarray(a.expert), exp)
  np.testing.assert_allclose(np.asarray(a.weight), wt, rtol=1e-5)


# --- TopKRouter module -------------------------------------------------------


def _router_cfg(e=5, k=2, order="softmax_topk", renormalize=True, jitter=0.0):
  c = default_config().moe
  c.num_experts, c.top_k = e, k
  c.topk.order, c.topk.renormalize, c.topk.jitter = order, renormalize, jitter
  return ml_collections.FrozenConfigDict(c)


def _init_router(cfg, x):
  mod = TopKRouter(cfg)
  params = mod.init(jax.random.key(0), x, shape_BxL=(1, x.shape[0]))
  return mod, params


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_router_module_logits_and_assignment(order, renormalize):
  t, d, e, k = 11, 8, 5, 2
  x = np.random.default_rng(2).standard_normal((t, d)).astype(np.float32)
  cfg = _router_cfg(e, k, order, renormalize)
  mod, params = _init_router(cfg, jnp.asarray(x))
  w_gate = np.asarray(params["params"]["w_gate"])
  assert w_gate.shape == (d, e) and w_gate.dtype == np.float32
  out = mod.apply(params, jnp.asarray(x), shape_BxL=(1, t))
  logits = x.astype(np.float64) @ w_gate.astype(np.float64)
  np.testing.assert_allclose(np.asarray(out.logits_TxE), logits, rtol=1e-5,
                             atol=1e-6)
  tok, exp, wt, p = ref.topk_route(logits, k, order, renormalize)
  np.testing.assert_array_equal(np.asarray(out.assignment.token), tok)
  np.testing.assert_array_equal(np.asarray(out.assignment.expert), exp)
  np.testing.assert_allclose(np.asarray(out.assignment.weight), wt, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out.probs_TxE), p, rtol=1e-5, atol=1e-7)
  assert out.losses == {} and out.metrics == {}


def test_router_jitter_only_when_not_deterministic():
  t, d, e, eps = 10, 8, 4, 0.2
  x = np.random.default_rng(3).standard_normal((t, d)).astype(np.float32)
  xj = jnp.asarray(x)
  mod, params = _init_router(_router_cfg(e, 2, jitter=eps), xj)
  w_gate = np.asarray(params["params"]["w_gate"], np.float64)
  clean = x.astype(np.float64) @ w_gate

  # Deterministic: no jitter and no rng needed.
  det = mod.apply(params, xj, shape_BxL=(1, t), deterministic=True)
  np.testing.assert_allclose(np.asarray(det.logits_TxE), clean, rtol=1e-5,
                             atol=1e-6)

  # Training: needs the "router" rng, perturbs the logits within the bound.
  with pytest.raises(Exception):
    mod.apply(params, xj, shape_BxL=(1, t), deterministic=False)
  apply = lambda key: mod.apply(params, xj, shape_BxL=(1, t),  # noqa: E731
                                deterministic=False, rngs={"router": key})
  j1 = np.asarray(apply(jax.random.key(1)).logits_TxE, np.float64)
  j1b = np.asarray(apply(jax.random.key(1)).logits_TxE, np.float64)
  j2 = np.asarray(apply(jax.random.key(2)).logits_TxE, np.float64)
  np.testing.assert_array_equal(j1, j1b)
  assert np.max(np.abs(j1 - clean)) > 1e-3
  assert np.max(np.abs(j1 - j2)) > 1e-3
  bound = eps * (np.abs(x).astype(np.float64) @ np.abs(w_gate)) + 1e-5
  assert np.all(np.abs(j1 - clean) <= bound)
  assert np.all(np.abs(j2 - clean) <= bound)

  # jitter = 0: training mode is exact and needs no rng.
  mod0, params0 = _init_router(_router_cfg(e, 2, jitter=0.0), xj)
  out0 = mod0.apply(params0, xj, shape_BxL=(1, t), deterministic=False)
  w0 = np.asarray(params0["params"]["w_gate"], np.float64)
  np.testing.assert_allclose(np.asarray(out0.logits_TxE),
                             x.astype(np.float64) @ w0, rtol=1e-5, atol=1e-6)
