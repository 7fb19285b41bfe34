"""Dispatchers (dense / dropless / capacity) against a NumPy reference MoE."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.moe.dispatch import DISPATCHERS, get_dispatcher
from moejax.moe.dispatch.capacity import (capacity_dispatch, capacity_positions,
                                          expert_capacity)
from moejax.moe.dispatch.dense import dense_dispatch
from moejax.moe.dispatch.dropless import dropless_dispatch, sort_by_expert
from moejax.moe.routers.topk import topk_route
from moejax.moe.types import Assignment

from . import reference as ref

D, F = 8, 16


def _cfg(capacity_factor=1.25, gmm_backend="auto"):
  return ml_collections.ConfigDict({"capacity_factor": capacity_factor,
                                    "gmm_backend": gmm_backend})


def _jitted(name, dtype=jnp.float32, capacity_factor=1.25, backend="auto"):
  """Jitted dispatcher, compiled once per shape across all tests."""
  if name != "capacity":  # the others ignore it: share their compilations
    capacity_factor = 1.25
  if name != "dropless":
    backend = "auto"
  return _jitted_cached(name, dtype, capacity_factor, backend)


@functools.lru_cache(maxsize=None)
def _jitted_cached(name, dtype, capacity_factor, backend):
  fn = get_dispatcher(name)
  cfg = _cfg(capacity_factor, backend)
  return jax.jit(lambda x, a, w: fn(x, a, ref.swiglu_experts(w, dtype), cfg=cfg))


@functools.lru_cache(maxsize=None)
def _positions(num_experts, capacity):
  return jax.jit(functools.partial(capacity_positions, num_experts=num_experts,
                                   capacity=capacity))


def _assignment(token, expert, weight, valid=None):
  token = np.asarray(token, np.int32)
  if valid is None:
    valid = np.ones(token.shape, bool)
  return Assignment(token=jnp.asarray(token),
                    expert=jnp.asarray(np.asarray(expert, np.int32)),
                    weight=jnp.asarray(np.asarray(weight, np.float32)),
                    valid=jnp.asarray(np.asarray(valid, bool)))


def _np(a: Assignment):
  return (np.asarray(a.token), np.asarray(a.expert), np.asarray(a.weight),
          np.asarray(a.valid))


def _problem(t, e, seed, f=F):
  """f < D puts dropless's combine weights on the hidden rows, f > D on the outputs."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, D)).astype(np.float32)
  w = ref.random_expert_weights(rng, e, D, f)
  return x, w, rng


def _jw(w):
  return {k: jnp.asarray(v) for k, v in w.items()}


def _assert_close(y, expected, rtol=1e-5, atol=1e-5):
  y = np.asarray(y)
  assert y.dtype == np.float32 and y.shape == expected.shape
  scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol * scale)


def test_registry():
  assert DISPATCHERS == {"dense": dense_dispatch, "capacity": capacity_dispatch,
                         "dropless": dropless_dispatch}
  with pytest.raises(ValueError, match="moe.dispatch"):
    get_dispatcher("nope")


# --- hand-built cases ---------------------------------------------------------


def _case(name):
  """(T, E, token, expert, weight, valid) for named corner cases."""
  if name == "topk_random":
    t, e = 13, 4
    lg = np.random.default_rng(7).standard_normal((t, e))
    a, _ = topk_route(jnp.asarray(lg, jnp.float32), 2)
    tok, exp, wt, val = _np(a)
    return t, e, tok, exp, wt, val
  if name == "empty_expert":  # expert 2 of 4 receives nothing
    t, e = 6, 4
    return (t, e, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5],
            [0, 1, 3, 0, 1, 3, 1, 3, 0, 1, 3, 0],
            np.linspace(0.1, 1.2, 12), None)
  if name == "one_expert_all":  # every slot to expert 1 of 3
    t, e = 9, 3
    tok = list(range(t)) * 2
    return t, e, tok, [1] * (2 * t), np.linspace(-1, 1, 2 * t), None
  if name == "invalid_slots":  # invalid slots carry big weights: must not leak
    t, e = 5, 3
    return (t, e, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
            [0, 1, 2, 0, 1, 2, 0, 1, 2, 0],
            [0.5, 0.7, 0.9, 100.0, 0.2, -50.0, 0.3, 0.4, 7.0, 0.1],
            [1, 1, 1, 0, 1, 0, 1, 1, 0, 1])
  if name == "t13_odd":  # T = 13, A = 17, E = 5: nothing divides anything
    t, e = 13, 5
    rng = np.random.default_rng(13)
    return (t, e, rng.integers(0, t, 17), rng.integers(0, e, 17),
            rng.uniform(0.1, 1.0, 17), None)
  if name == "duplicates":  # token 1 sent twice to expert 0, token 3 thrice to 2
    t, e = 4, 3
    return (t, e, [0, 1, 1, 2, 3, 3, 3], [1, 0, 0, 2, 2, 2, 2],
            [0.3, 0.25, 0.5, 1.0, 0.1, 0.2, 0.3], None)
  if name == "all_invalid":
    t, e = 3, 2
    return t, e, [0, 1, 2], [0, 1, 0], [1.0, 1.0, 1.0], [0, 0, 0]
  raise ValueError(name)


CASES = ("topk_random", "empty_expert", "one_expert_all", "invalid_slots",
         "t13_odd", "duplicates", "all_invalid")


@pytest.mark.parametrize("name", ["dense", "dropless"])
@pytest.mark.parametrize("case", CASES)
def test_dispatch_matches_reference(name, case):
  t, e, tok, exp, wt, val = _case(case)
  x, w, _ = _problem(t, e, seed=len(case))
  a = _assignment(tok, exp, wt, val)
  y, stats = _jitted(name)(jnp.asarray(x), a, _jw(w))
  expected = ref.moe(x, *_np(a), w)
  _assert_close(y, expected)
  assert float(stats["dropped_fraction"]) == 0.0
  if case == "all_invalid":
    assert np.all(np.asarray(y) == 0.0)
  if case == "empty_expert":  # the reference really has an empty expert
    assert 2 not in np.asarray(exp)


@pytest.mark.parametrize("case", CASES)
def test_capacity_without_drops_matches_reference_and_dropless(case):
  t, e, tok, exp, wt, val = _case(case)
  x, w, _ = _problem(t, e, seed=len(case))
  a = _assignment(tok, exp, wt, val)
  # capacity_factor = E gives C = A: no expert can overflow.
  y, stats = _jitted("capacity", capacity_factor=float(e))(jnp.asarray(x), a,
                                                            _jw(w))
  y_dl, _ = _jitted("dropless")(jnp.asarray(x), a, _jw(w))
  _assert_close(y, ref.moe(x, *_np(a), w))
  _assert_close(y, np.asarray(y_dl, np.float64))
  assert float(stats["dropped_fraction"]) == 0.0


def test_dropless_equals_dense_random_topk():
  # Same shape as the "topk_random" case: reuses its compilations.
  t, e, k = 13, 4, 2
  for seed in range(4):
    x, w, rng = _problem(t, e, seed=100 + seed)
    order = ("softmax_topk", "topk_softmax")[seed % 2]
    a, _ = topk_route(jnp.asarray(3.0 * rng.standard_normal((t, e)),
                                  jnp.float32), k, order)
    y_dense, _ = _jitted("dense")(jnp.asarray(x), a, _jw(w))
    y_dl, _ = _jitted("dropless")(jnp.asarray(x), a, _jw(w))
    _assert_close(y_dl, np.asarray(y_dense, np.float64))
    _assert_close(y_dl, ref.moe(x, *_np(a), w))


@pytest.mark.parametrize("case", CASES)
def test_sort_by_expert_groups_valid_slots_invalid_last(case):
  _, e, tok, exp, wt, val = _case(case)
  a = _assignment(tok, exp, wt, val)
  order, sizes = jax.jit(sort_by_expert, static_argnums=1)(a, e)
  _, exp, _, val = _np(a)
  order = np.asarray(order)
  assert sorted(order.tolist()) == list(range(len(exp)))  # a permutation
  np.testing.assert_array_equal(np.asarray(sizes), ref.counts(exp, val, e))
  n_valid = int(np.sum(val))
  assert np.all(val[order[:n_valid]]) and not np.any(val[order[n_valid:]])
  # Valid slots by expert, each group in slot order (stable).
  want = [a_ for g in range(e) for a_ in range(len(exp))
          if val[a_] and exp[a_] == g]
  np.testing.assert_array_equal(order[:n_valid], want)


def test_dropless_xla_backend():
  t, e, tok, exp, wt, val = _case("invalid_slots")
  x, w, _ = _problem(t, e, seed=1)
  a = _assignment(tok, exp, wt, val)
  y_xla, _ = _jitted("dropless", backend="xla")(jnp.asarray(x), a, _jw(w))
  _assert_close(y_xla, ref.moe(x, *_np(a), w))


# --- capacity: positions, drops, formula ---------------------------------------


@pytest.mark.parametrize("a,e,cf,expected", [
    (8, 3, 0.75, 2),      # 0.75 * 8 / 3 = 2 exactly
    (26, 4, 1.25, 9),     # ceil(8.125)
    (12, 4, 1.0, 3),
    (13, 5, 1.0, 3),      # ceil(2.6)
    (1, 8, 1.0, 1),       # ceil(0.125) = 1
    (2, 64, 0.01, 1),     # would be ceil(0.0003) = 1; never 0
    (64, 8, 2.0, 16),
])
def test_expert_capacity_formula(a, e, cf, expected):
  assert expert_capacity(a, e, cf) == expected


def test_capacity_hand_built_drops():
  # 8 slots, 3 experts, capacity_factor 0.75 -> C = ceil(0.75 * 8 / 3) = 2.
  #  slot:    0  1  2  3  4  5  6  7
  #  expert:  0  0  1  0  2  0  1  1
  #  valid:   y  y  y  n  y  y  y  y
  #  pos:     0  1  0  -  0  2  1  2   (earlier *valid* slots of that expert)
  #  kept:    y  y  y  n  y  n  y  n   -> slots 5 and 7 dropped (pos >= 2),
  #                                      slot 3 is invalid, not "dropped".
  # dropped_fraction = 2 dropped / 7 valid.
  token = [0, 1, 2, 3, 4, 5, 0, 1]
  expert = [0, 0, 1, 0, 2, 0, 1, 1]
  valid = [1, 1, 1, 0, 1, 1, 1, 1]
  weight = [0.9, 0.8, 0.7, 5.0, 0.6, 0.5, 0.4, 0.3]
  a = _assignment(token, expert, weight, valid)
  assert expert_capacity(8, 3, 0.75) == 2
  pos, keep = capacity_positions(a, 3, 2)
  assert pos.dtype == jnp.int32 and keep.dtype == jnp.bool_
  v = np.asarray(valid, bool)
  np.testing.assert_array_equal(np.asarray(pos)[v], [0, 1, 0, 0, 2, 1, 2])
  np.testing.assert_array_equal(np.asarray(keep),
                                [1, 1, 1, 0, 1, 0, 1, 0])
  # With C = 3 nothing drops: expert 0 has 3 valid slots (0, 1, 5), expert 1
  # has 3 (2, 6, 7), expert 2 has 1 (4).
  np.testing.assert_array_equal(np.asarray(capacity_positions(a, 3, 3)[1]), v)
  # With C = 1 only each expert's first valid slot survives: 0, 2, 4.
  np.testing.assert_array_equal(np.asarray(capacity_positions(a, 3, 1)[1]),
                                [1, 0, 1, 0, 1, 0, 0, 0])

  x, w, _ = _problem(6, 3, seed=11)
  y, stats = _jitted("capacity", capacity_factor=0.75)(jnp.asarray(x), a,
                                                       _jw(w))
  kept = np.array([1, 1, 1, 0, 1, 0, 1, 0], bool)
  _assert_close(y, ref.moe(x, token, expert, weight, kept, w))
  np.testing.assert_allclose(float(stats["dropped_fraction"]), 2.0 / 7.0,
                             rtol=1e-6)
  # Token 3's only slot is invalid and token 5's was dropped: exact zeros.
  assert np.all(np.asarray(y)[[3, 5]] == 0.0)


def test_capacity_drops_second_choices_first():
  # Choice-major slots: with C = T / E every expert fills up on first choices.
  # 4 tokens, 2 experts, k = 2: first choices [0, 0, 1, 1], second [1, 1, 0, 0].
  # A = 8, capacity_factor 0.5 -> C = ceil(0.5 * 8 / 2) = 2: all first choices
  # are kept and all second choices dropped; dropped_fraction = 4 / 8.
  logits = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]], np.float32)
  a, _ = topk_route(jnp.asarray(logits), 2)
  _, keep = capacity_positions(a, 2, expert_capacity(8, 2, 0.5))
  np.testing.assert_array_equal(np.asarray(keep), [1, 1, 1, 1, 0, 0, 0, 0])
  x, w, _ = _problem(4, 2, seed=5)
  y, stats = _jitted("capacity", capacity_factor=0.5)(jnp.asarray(x), a, _jw(w))
  tok, exp, wt, val = _np(a)
  _assert_close(y, ref.moe(x, tok, exp, wt, val & (np.arange(8) < 4), w))
  np.testing.assert_allclose(float(stats["dropped_fraction"]), 0.5, rtol=1e-6)


# --- property-based -------------------------------------------------------------

# The shapes (T, E, A) of the hand-built cases above (plus T = E = A = 1), so
# the compilations are shared; hypothesis varies the contents: tokens,
# experts, validity and weights.
SHAPES = [(1, 1, 1), (13, 4, 26), (6, 4, 12), (9, 3, 18), (5, 3, 10),
          (13, 5, 17), (4, 3, 7), (3, 2, 3)]


@settings(derandomize=True, deadline=None, max_examples=25)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16),
       skew=st.sampled_from(["random", "one_expert", "empty_experts",
                             "duplicates"]),
       valid_p=st.sampled_from([1.0, 0.7, 0.2, 0.0]),
       small_capacity=st.booleans(), f=st.sampled_from([F, D // 2]))
def test_dispatchers_hypothesis(shape, seed, skew, valid_p, small_capacity, f):
  t, e, n = shape
  # 0.5 drops whenever an expert gets more than half its fair share; E never.
  cf = 0.5 if small_capacity else float(e)
  x, w, rng = _problem(t, e, seed, f)
  token = rng.integers(0, t, n)
  if skew == "random":
    expert = rng.integers(0, e, n)
  elif skew == "one_expert":
    expert = np.full(n, rng.integers(e))
  elif skew == "empty_experts":  # only the even experts receive anything
    expert = 2 * rng.integers(0, (e + 1) // 2, n)
  else:  # few tokens, few experts: many (token, expert) duplicates
    token = rng.integers(0, min(t, 2), n)
    expert = rng.integers(0, min(e, 2), n)
  weight = rng.uniform(-1.0, 1.5, n)
  valid = rng.uniform(size=n) < valid_p
  a = _assignment(token, expert, weight, valid)
  tok, exp, wt, val = _np(a)
  jx, jw = jnp.asarray(x), _jw(w)

  expected = ref.moe(x, tok, exp, wt, val, w)
  y_dense, _ = _jitted("dense")(jx, a, jw)
  y_dl, st_dl = _jitted("dropless")(jx, a, jw)
  _assert_close(y_dense, expected)
  _assert_close(y_dl, expected)
  _assert_close(y_dl, np.asarray(y_dense, np.float64))
  assert float(st_dl["dropped_fraction"]) == 0.0

  c = expert_capacity(n, e, cf)
  ref_pos, ref_keep = ref.capacity_keep(exp, val, e, c)
  pos, keep = _positions(e, c)(a)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  np.testing.assert_array_equal(np.asarray(pos)[val], ref_pos[val])
  y_cap, st_cap = _jitted("capacity", capacity_factor=cf)(jx, a, jw)
  _assert_close(y_cap, ref.moe(x, tok, exp, wt, val, w, keep=ref_keep))
  n_valid = int(np.sum(val))
  expected_drop = (n_valid - int(np.sum(ref_keep))) / max(n_valid, 1)
  np.testing.assert_allclose(float(st_cap["dropped_fraction"]), expected_drop,
                             rtol=1e-6, atol=1e-7)


# --- dtypes and gradients --------------------------------------------------------


@pytest.mark.parametrize("name", ["dense", "dropless", "capacity"])
def test_bfloat16_close_to_float32(name):
  t, e = 13, 4
  x, w, rng = _problem(t, e, seed=21)
  a, _ = topk_route(jnp.asarray(rng.standard_normal((t, e)), jnp.float32), 2)
  expected = ref.moe(x, *_np(a), w)
  y, _ = _jitted(name, dtype=jnp.bfloat16, capacity_factor=float(e))(
      jnp.asarray(x), a, _jw(w))
  assert y.dtype == jnp.float32
  _assert_close(y, expected, rtol=0.0, atol=3e-2)
  # ... but bf16 really was used: not bit-identical to float32.
  y32, _ = _jitted(name, capacity_factor=float(e))(jnp.asarray(x), a, _jw(w))
  assert np.max(np.abs(np.asarray(y) - np.asarray(y32))) > 1e-6


def _loss_fn(name):
  fn = get_dispatcher(name)
  cfg = _cfg(4.0)

  def loss(x, w, weight, a, ct):
    a = a.replace(weight=weight)
    y, _ = fn(x, a, ref.swiglu_experts(w, jnp.float32), cfg=cfg)
    return jnp.sum(y * ct)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("f", [F, D // 2], ids=["F>D", "F<D"])
def test_dropless_gradients_equal_dense(f):
  # T = 13, E = 4 with an empty expert (2), invalid slots with large weights,
  # and token 1 sent twice to expert 0.
  t, e = 13, 4
  tok = [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 5, 3]
  exp = [1, 0, 0, 3, 3, 1, 0, 2, 3, 1, 0, 3, 1, 0, 3, 3, 1]
  wt = np.linspace(-0.5, 1.0, len(tok))
  wt[[7, 15]] = 50.0
  val = np.ones(len(tok), bool)
  val[[7, 15]] = False  # slot 7 was expert 2's only slot
  x, w, rng = _problem(t, e, seed=2, f=f)
  ct = rng.standard_normal((t, D)).astype(np.float32)
  a = _assignment(tok, exp, wt, val)
  args = (jnp.asarray(x), _jw(w), a.weight, a, jnp.asarray(ct))
  g_dense = _loss_fn("dense")(*args)
  g_dl = _loss_fn("dropless")(*args)
  g_cap = _loss_fn("capacity")(*args)  # capacity_factor 4 >= E here: no drops
  for g in (g_dl, g_cap):
    for gd, gx in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g)):
      _assert_close(gx, np.asarray(gd, np.float64), rtol=1e-5, atol=2e-5)
  # d loss / d weight[a] = valid[a] * <ct[token[a]], FFN_expert[a](x[token[a]])>
  tok, exp, _, val = _np(a)
  gw = np.array([
      float(val[s]) * float(ct[tok[s]].astype(np.float64) @ ref.swiglu(
          x[tok[s]], w["w_gate"][exp[s]], w["w_up"][exp[s]], w["w_down"][exp[s]]))
      for s in range(len(tok))])
  _assert_close(g_dl[2], gw, rtol=1e-5, atol=2e-5)
  _assert_close(g_dense[2], gw, rtol=1e-5, atol=2e-5)
  for g in (g_dense, g_dl):  # an expert with no tokens gets zero gradient
    for k in ("w_gate", "w_up", "w_down"):
      assert np.all(np.asarray(g[1][k][2]) == 0.0)
      assert np.any(np.asarray(g[1][k][1]) != 0.0)
