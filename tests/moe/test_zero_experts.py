"""Zero-computation experts: routing, the layer's copy / constant experts, the budget bias.

Against independent slow references (per-token NumPy loops): the routing over E FFN
+ Z zero-computation choices with the FFN experts' bias, the whole MoE layer with
zero, copy and constant experts, and LongCat-Flash's bias update; null_experts as
the special case with only zero experts; the controller reaching its target; the
parameter counts; the config rejections.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe.routers.zero_experts import (ZeroExpertsRouter, update_ffn_bias,
                                             zero_choice_route)
from moejax.moe.state import update_router_state
from moejax.moe.zero_experts import ZeroComputation
from moejax.validation import validate
from tests.conftest import tiny_config

from . import reference as ref

B, L, D, F = 2, 6, 8, 16


def _route_ref(logits, k, e, bias, renormalize):
  """Per token: picks by probs + bias (FFN experts only), weights the unbiased probs.

  Returns (picks [T, k], weights [T, k], probs [T, N]), float64.
  """
  logits = np.asarray(logits, np.float64)
  t, n = logits.shape
  picks = np.zeros((t, k), np.int64)
  weights = np.zeros((t, k))
  probs = np.zeros((t, n))
  for i in range(t):
    probs[i] = ref.softmax(logits[i])
    score = probs[i].copy()
    if bias is not None:
      for j in range(e):
        score[j] += bias[j]
    order = np.argsort(-score, kind="stable")[:k]
    w = probs[i][order]
    if renormalize:
      w = w / np.sum(w)
    picks[i], weights[i] = order, w
  return picks, weights, probs


# E = 2 FFN experts (0, 1) + zero (2), copy (3), constant (4); logits = log(probs).
PROBS = np.array([[0.40, 0.30, 0.10, 0.15, 0.05],    # FFN 0, 1
                  [0.10, 0.35, 0.05, 0.40, 0.10],    # copy, then FFN 1
                  [0.05, 0.10, 0.30, 0.15, 0.40]])   # constant, then zero: no FFN


def test_route_by_hand():
  lg = jnp.asarray(np.log(PROBS), jnp.float32)
  a, probs, zero_TxZ, counts, picks = zero_choice_route(lg, 2, 2)
  np.testing.assert_array_equal(picks, [[0, 1], [3, 1], [4, 2]])
  np.testing.assert_array_equal(a.token, [0, 1, 2, 0, 1, 2])  # choice-major
  np.testing.assert_array_equal(a.valid, [True, False, False, True, True, False])
  np.testing.assert_array_equal(a.expert, [0, 1, 1, 1, 1, 1])  # zero picks clipped to E-1
  np.testing.assert_allclose(a.weight, [.4 / .7, 0, 0, .3 / .7, .35 / .75, 0], rtol=1e-5)
  np.testing.assert_allclose(zero_TxZ, [[0, 0, 0], [0, .4 / .75, 0], [.3 / .7, 0, .4 / .7]],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(counts, [1, 2, 1, 1, 1])
  np.testing.assert_allclose(probs, PROBS, rtol=1e-5)
  # A bias on FFN expert 1 changes token 2's picks, not its weights (the unbiased probs).
  a, _, zero_TxZ, _, picks = zero_choice_route(lg, 2, 2, jnp.asarray([0.0, 0.35]))
  np.testing.assert_array_equal(picks[2], [1, 4])
  np.testing.assert_allclose(np.asarray(a.weight)[[2, 5]], [.1 / .5, 0], rtol=1e-5)
  np.testing.assert_allclose(zero_TxZ[2], [0, 0, .4 / .5], rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _jit_route(k, e, with_bias, renormalize):
  if with_bias:
    return jax.jit(lambda lg, b: zero_choice_route(lg, k, e, b, renormalize))
  return jax.jit(lambda lg, b: zero_choice_route(lg, k, e, None, renormalize))


@settings(derandomize=True, deadline=None, max_examples=20)
@given(shape=st.sampled_from([(6, 4, 3, 2), (5, 2, 1, 1), (7, 3, 4, 3)]),
       with_bias=st.booleans(), renormalize=st.booleans(), seed=st.integers(0, 2**16))
def test_route_matches_reference(shape, with_bias, renormalize, seed):
  t, e, z, k = shape
  rng = np.random.default_rng(seed)
  logits = (1.5 * rng.standard_normal((t, e + z))).astype(np.float32)
  bias = (0.2 * rng.standard_normal(e)).astype(np.float32) if with_bias else None
  a, probs, zero_TxZ, counts, _ = _jit_route(k, e, with_bias, renormalize)(
      jnp.asarray(logits), None if bias is None else jnp.asarray(bias))
  picks, weights, probs_ref = _route_ref(logits, k, e, bias, renormalize)
  np.testing.assert_allclose(probs, probs_ref, rtol=1e-5, atol=1e-7)
  w_ffn = np.zeros((t, e))
  w_zero = np.zeros((t, z))
  for i in range(t):
    for c in range(k):
      j = picks[i, c]
      if j < e:
        w_ffn[i, j] += weights[i, c]
      else:
        w_zero[i, j - e] += weights[i, c]
  np.testing.assert_allclose(a.combine_matrix(t, e), w_ffn, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(zero_TxZ, w_zero, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.sum(a.valid), np.sum(picks < e))
  np.testing.assert_array_equal(counts, np.bincount(picks.reshape(-1), minlength=e + z))


def _moe_cfg(zero=1, copy=1, constant=2, target=1.2, e=4, k=2, router="zero_experts",
             renormalize=True):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden = router, e, k, F
  o = c.zero_experts
  o.zero, o.copy, o.constant, o.target, o.renormalize = zero, copy, constant, target, renormalize
  return ml_collections.FrozenConfigDict(c)


def _random_variables(layer, x, seed=0, moe_state=None):
  """Random params of `layer`'s structure (eval_shape: no compile), plus `moe_state`."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(
      rng.standard_normal(s.shape) / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 1),
      s.dtype), shapes)
  out = {"params": params}
  if moe_state is not None:
    out["moe_state"] = moe_state
  return out


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, L, D)), jnp.float32)


def test_layer_matches_per_token_loop():
  """The MoE layer (FFN + zero + copy + constant experts, nonzero bias) token by token."""
  cfg = _moe_cfg(zero=1, copy=1, constant=2, target=1.2)
  layer = MoELayer(cfg)
  x = _x(1)
  bias = np.array([0.05, -0.1, 0.0, 0.12], np.float32)
  v = _random_variables(layer, x, moe_state={"router": {"bias": jnp.asarray(bias)}})
  y, aux, _ = jax.jit(layer.apply)(v, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  x_TxD = np.asarray(x, np.float64).reshape(-1, D)
  t, e, k, z = x_TxD.shape[0], 4, 2, 4
  picks, weights, probs = _route_ref(x_TxD @ p["router"]["w_gate"], k, e, bias, True)
  want = np.zeros_like(x_TxD)
  for i in range(t):
    xi = x_TxD[i]
    for c in range(k):
      j, w = picks[i, c], weights[i, c]
      if j < e:  # an FFN expert
        ex = p["experts"]
        want[i] += w * ref.swiglu(xi, ex["w_gate"][j], ex["w_up"][j], ex["w_down"][j])
      elif j == e:  # zero
        pass
      elif j == e + 1:  # copy
        want[i] += w * xi
      else:  # constant expert j - e - 2
        q = j - e - 2
        a = ref.softmax(xi @ p["zero_experts"]["w_const"][q])
        want[i] += w * (a[0] * xi + a[1] * p["zero_experts"]["v"][q])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  m = aux["metrics"]
  ffn = picks < e
  np.testing.assert_allclose(m["experts_per_token"], ffn.sum() / t, rtol=1e-6)
  for kind, j in (("zero", e), ("copy", e + 1)):
    np.testing.assert_allclose(m[f"{kind}_fraction"], np.mean(picks == j), rtol=1e-6)
  np.testing.assert_allclose(m["constant_fraction"], np.mean(picks >= e + 2), rtol=1e-6)
  counts = np.bincount(picks.reshape(-1), minlength=e + z).astype(np.float64)
  np.testing.assert_allclose(aux["state_stats"]["counts"], counts)
  np.testing.assert_allclose(aux["losses"]["load_balance"],
                             ref.switch_load_balance(probs, counts), rtol=1e-5)
  np.testing.assert_allclose(aux["losses"]["z_loss"],
                             ref.router_z_loss(x_TxD @ p["router"]["w_gate"]), rtol=1e-5)
  np.testing.assert_allclose(m["load"], counts[:e] / counts[:e].sum(), rtol=1e-6)


def test_gradients_reach_the_constant_experts_and_gate():
  cfg = _moe_cfg(target=0.0)
  layer = MoELayer(cfg)
  x = _x(2)
  v = _random_variables(layer, x, seed=3)
  r = jnp.asarray(np.random.default_rng(4).standard_normal((B, L, D)), jnp.float32)
  g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)[0] * r)))(v["params"])
  for leaf in (g["zero_experts"]["v"], g["zero_experts"]["w_const"], g["router"]["w_gate"]):
    assert np.all(np.isfinite(leaf)) and np.any(np.asarray(leaf) != 0)


def test_null_experts_is_the_zero_only_case():
  """null_experts = zero_experts with only zero experts and no bias: the same layer."""
  e, z = 4, default_config().moe.null_experts.num_null
  zero_cfg = _moe_cfg(zero=z, copy=0, constant=0, target=0.0, e=e)
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden = "null_experts", e, 2, F
  null_cfg = ml_collections.FrozenConfigDict(c)
  x = _x(5)
  layers = MoELayer(null_cfg), MoELayer(zero_cfg)
  v = _random_variables(layers[0], x, seed=6)
  shapes = jax.eval_shape(layers[1].init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, v["params"])
  (y0, a0, _), (y1, a1, _) = jax.jit(lambda v: [m.apply(v, x) for m in layers])(v)
  np.testing.assert_array_equal(y0, y1)
  for key in a0["losses"]:
    np.testing.assert_array_equal(a0["losses"][key], a1["losses"][key])
  for key in ("load", "experts_per_token", "router_entropy"):
    np.testing.assert_array_equal(a0["metrics"][key], a1["metrics"][key])
  np.testing.assert_allclose(a0["metrics"]["null_fraction"], a1["metrics"]["zero_fraction"],
                             atol=1e-7)
  assert a1["metrics"]["copy_fraction"] == 0 and a1["metrics"]["constant_fraction"] == 0


@settings(derandomize=True, deadline=None, max_examples=15)
@given(e=st.integers(1, 6), z=st.integers(1, 4), k=st.integers(1, 3),
       target=st.floats(0.1, 3.0), seed=st.integers(0, 2**16))
def test_bias_update_matches_formula(e, z, k, target, seed):
  """b_i += rate * (K_e / (k E) - T_i / sum_j T_j) for each FFN expert, in a loop."""
  rng = np.random.default_rng(seed)
  bias = rng.standard_normal(e).astype(np.float32)
  counts = rng.integers(0, 20, e + z).astype(np.float32)
  rate = 0.03
  got = np.asarray(update_ffn_bias(jnp.asarray(bias), jnp.asarray(counts), target, k, rate))
  total = max(float(sum(counts)), 1.0)
  for i in range(e):
    want = bias[i] + rate * (target / (k * e) - counts[i] / total)
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_state_update_per_layer():
  """moejax.moe.state updates each MoE layer's bias from its own global-batch counts."""
  cfg = _moe_cfg(target=1.5)
  bias_PxE = np.array([[0.0, 0.1, 0.0, -0.2], [0.3, 0.0, 0.0, 0.0]], np.float32)
  counts_PxN = np.array([[4, 0, 2, 2, 1, 1, 2, 0], [1, 1, 1, 1, 4, 4, 0, 0]], np.float32)
  state = {"moe_layers": {"block0": {"moe": {"router": {"bias": jnp.asarray(bias_PxE)}}}}}
  new = update_router_state(state, {"counts": jnp.asarray(counts_PxN)}, cfg)
  got = np.asarray(new["moe_layers"]["block0"]["moe"]["router"]["bias"])
  for p in range(2):
    want = bias_PxE[p] + cfg.zero_experts.rate * (
        1.5 / (2 * 4) - counts_PxN[p, :4] / counts_PxN[p].sum())
    np.testing.assert_allclose(got[p], want, rtol=1e-6)


@pytest.mark.parametrize("target", [0.8, 1.6])
def test_controller_reaches_its_target(target):
  """Fixed logits, repeated route + update: the mean FFN experts per token nears the target.

  Without the bias these logits give about 2 * 4/7 = 1.14 FFN experts per token.
  """
  e, k = 4, 2
  logits = jnp.asarray(np.random.default_rng(7).standard_normal((512, e + 3)), jnp.float32)
  rate = 0.05

  @jax.jit
  def run(bias):
    def step(b, _):
      *_, counts, _ = zero_choice_route(logits, k, e, b)
      return update_ffn_bias(b, counts, target, k, rate), jnp.sum(counts[:e]) / 512
    return jax.lax.scan(step, bias, None, length=400)

  _, ffn_per_token = run(jnp.zeros((e,), jnp.float32))
  assert abs(float(ffn_per_token[0]) - target) > 0.25  # the bias has work to do
  np.testing.assert_allclose(np.mean(np.asarray(ffn_per_token[-100:])), target, atol=0.05)


def test_param_counts_match_init():
  """Router columns E + Z, v and W_c per constant expert; active = total - unused FFN experts."""
  cfg = tiny_config(router="zero_experts")
  cfg.moe.zero_experts.constant = 2
  cfg.moe.zero_experts.target = 1.5
  variables = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))
  p = variables["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  moe = p["moe_layers"]["block0"]["moe"]
  assert moe["router"]["w_gate"].shape == (2, 32, 4 + 4)
  assert moe["zero_experts"]["v"].shape == (2, 2, 32)
  assert moe["zero_experts"]["w_const"].shape == (2, 2, 32, 2)
  assert variables["moe_state"]["moe_layers"]["block0"]["moe"]["router"]["bias"].shape == (2, 4)
  inactive = 2 * (4 - 2) * 3 * 32 * 32  # 2 MoE layers, E - k unused SwiGLU experts each
  assert counts["params_active"] == counts["params_total"] - inactive
  assert ZeroExpertsRouter.param_count(cfg.moe, 32) == 32 * 8
  assert ZeroComputation(1, 1, 2).param_count(32) == 2 * 3 * 32


@pytest.mark.parametrize("overrides,message", [
    ({"zero": 0, "copy": 0, "constant": 0}, r"moe.zero_experts.zero=0 .*zero \+ copy \+ constant"),
    ({"copy": -1}, r"moe.zero_experts.copy=-1 .*non-negative integer"),
    ({"target": 2.5}, r"moe.zero_experts.target=2.5 .*\[0, moe.top_k=2\]"),
    ({"target": -1.0}, r"moe.zero_experts.target=-1.0 .*non-negative"),
    ({"rate": 0.0}, r"moe.zero_experts.rate=0.0 .*positive"),
    ({"zero": 1, "copy": 0, "constant": 0, "target": 0.5, "top_k": 3},
     r"moe.zero_experts.target=0.5 .*\[2, moe.top_k=3\].*at least 2 FFN experts"),
    ({"top_k": 1}, r"moe.zero_experts.renormalize=True .*moe.top_k=1"),
])
def test_config_rejections(overrides, message):
  cfg = tiny_config(router="zero_experts")
  for key, value in overrides.items():
    (cfg.moe if key == "top_k" else cfg.moe.zero_experts)[key] = value
  with pytest.raises(ConfigError, match=message):
    validate(cfg)


def test_architectures_variant_meets_the_quickstart_budget():
  """configs/architectures.py:zero_experts targets the quickstart's 2 FFN experts per token."""
  from configs.architectures import get_config  # noqa: PLC0415
  cfg, base = get_config("zero_experts"), get_config("topk")
  validate(cfg)
  assert cfg.moe.zero_experts.target == base.moe.top_k
  assert cfg.moe.expert_hidden == base.moe.expert_hidden
  z = cfg.moe.zero_experts
  e = cfg.moe.num_experts
  # The balancing loss's uniform spread gives the target's FFN share too.
  assert cfg.moe.top_k * e / (e + z.zero + z.copy + z.constant) == z.target
