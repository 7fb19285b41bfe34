"""`MoELayer` end to end against NumPy and against a dense SwiGLU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.config import default_config
from moejax.layers import swiglu
from moejax.moe import MoELayer

from . import reference as ref

B, L, D, F = 2, 7, 8, 16  # T = 14 tokens

LOSS_KEYS = {"load_balance", "z_loss"}
# The layer's own metrics; the top-k router declares none of its own.
METRIC_KEYS = {"load", "load_max_over_mean", "load_cv", "router_entropy",
               "top1_prob", "experts_per_token", "dropped_fraction"}


def _cfg(e=4, k=2, dispatch="dense", shared=0, order="softmax_topk",
         renormalize=True, cf=1.25, shared_hidden=0, shared_gate=False):
  c = default_config().moe
  c.num_experts, c.top_k, c.expert_hidden = e, k, F
  c.dispatch, c.num_shared_experts, c.capacity_factor = dispatch, shared, cf
  c.shared_hidden, c.shared_gate = shared_hidden, shared_gate
  c.topk.order, c.topk.renormalize = order, renormalize
  return ml_collections.FrozenConfigDict(c)


@functools.lru_cache(maxsize=None)
def _layer(cfg, dtype="float32"):
  layer = MoELayer(cfg, dtype=dtype)
  # (y, aux); the third output, the router carry, is None for these routers.
  return layer, jax.jit(lambda *a, **kw: layer.apply(*a, **kw)[:2])


def _x(seed=0):
  return np.random.default_rng(seed).standard_normal((B, L, D)).astype(np.float32)


def _init(cfg, x, seed=0):
  """Random float32 params with the structure `MoELayer.init` gives.

  The structure and shapes come from `jax.eval_shape(layer.init, ...)` (no
  compilation); the values are drawn with NumPy, scaled like fan-in init.
  """
  layer, apply = _layer(cfg)
  shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.asarray(x))
  rng = np.random.default_rng(seed)

  def draw(s):
    fan_in = s.shape[-2]
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in),
                       s.dtype)

  return jax.tree.map(draw, shapes), apply


def _np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])


def _reference_layer(p, x, cfg):
  """Whole layer in NumPy: gate, top-k, routed experts, shared experts, aux."""
  x_TxD = np.asarray(x, np.float64).reshape(-1, D)
  t = x_TxD.shape[0]
  logits = x_TxD @ p["router"]["w_gate"]
  tok, exp, wt, probs = ref.topk_route(logits, cfg.top_k, cfg.topk.order,
                                       cfg.topk.renormalize)
  valid = np.ones(len(tok), bool)
  y = ref.moe(x_TxD, tok, exp, wt, valid, p["experts"])
  if cfg.num_shared_experts:
    s = p["shared"]
    for i in range(t):
      gate = 1.0
      if cfg.shared_gate:  # Qwen2-MoE: sigmoid(x . w_g) scales the shared output
        gate = 1.0 / (1.0 + np.exp(-float(x_TxD[i] @ p["shared_gate"]["w"][:, 0])))
      y[i] += gate * ref.swiglu(x_TxD[i], s["w_gate"], s["w_up"], s["w_down"])
  counts = ref.counts(exp, valid, cfg.num_experts)
  losses = {"load_balance": ref.switch_load_balance(probs, counts),
            "z_loss": ref.router_z_loss(logits)}
  metrics = {**ref.load_metrics(counts), **ref.router_metrics(probs),
             "experts_per_token": len(tok) / t, "dropped_fraction": 0.0}
  return y.reshape(x.shape), losses, metrics


def _assert_aux_schema(aux, e):
  assert set(aux) == {"losses", "metrics", "state_stats", "balance_counts"}
  assert aux["balance_counts"].shape == (e,)
  assert aux["state_stats"] == {}  # top-k keeps no non-trained state
  assert set(aux["losses"]) == LOSS_KEYS
  assert set(aux["metrics"]) == METRIC_KEYS
  for v in aux["losses"].values():
    assert v.shape == () and v.dtype == jnp.float32
  for k, v in aux["metrics"].items():
    assert v.shape == ((e,) if k == "load" else ()), k
    assert v.dtype == jnp.float32, k


@pytest.mark.parametrize("dispatch,order", [("dense", "softmax_topk"),
                                            ("dropless", "topk_softmax"),
                                            ("capacity", "softmax_topk")])
def test_single_expert_equals_dense_swiglu(dispatch, order):
  cfg = _cfg(e=1, k=1, dispatch=dispatch, order=order, renormalize=False)
  x = _x(1)
  params, apply = _init(cfg, x)
  y, aux = apply(params, jnp.asarray(x))
  assert y.shape == (B, L, D) and y.dtype == jnp.float32
  w = params["params"]["experts"]
  assert w["w_gate"].shape == (1, D, F) and w["w_down"].shape == (1, F, D)
  dense = swiglu(jnp.asarray(x), w["w_gate"][0], w["w_up"][0], w["w_down"][0],
                 jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(dense), rtol=1e-5,
                             atol=1e-5)
  p = _np_params(params)
  expected = np.stack([[ref.swiglu(x[b, l], p["experts"]["w_gate"][0],
                                   p["experts"]["w_up"][0],
                                   p["experts"]["w_down"][0])
                        for l in range(L)] for b in range(B)])
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  _assert_aux_schema(aux, 1)
  m, lo = aux["metrics"], aux["losses"]
  np.testing.assert_allclose(np.asarray(m["load"]), [1.0])
  for key, val in (("load_max_over_mean", 1.0), ("load_cv", 0.0),
                   ("router_entropy", 0.0), ("top1_prob", 1.0),
                   ("experts_per_token", 1.0), ("dropped_fraction", 0.0)):
    np.testing.assert_allclose(float(m[key]), val, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(float(lo["load_balance"]), 1.0, rtol=1e-6)
  # One logit per token: logsumexp = the logit itself.
  logits = x.reshape(-1, D).astype(np.float64) @ p["router"]["w_gate"]
  np.testing.assert_allclose(float(lo["z_loss"]), np.mean(logits ** 2),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dispatch,shared,order", [
    ("dense", 0, "softmax_topk"),
    ("dropless", 0, "softmax_topk"),
    ("dropless", 2, "softmax_topk"),
    ("capacity", 1, "topk_softmax"),
])
def test_layer_matches_numpy(dispatch, shared, order):
  # capacity_factor = E: C = A, so capacity drops nothing and matches too.
  cfg = _cfg(e=4, k=2, dispatch=dispatch, shared=shared, order=order,
             renormalize=(order == "softmax_topk"), cf=4.0)
  x = _x(2)
  params, apply = _init(cfg, x, seed=3)
  if shared:
    s = params["params"]["shared"]
    assert s["w_gate"].shape == (D, shared * F)
    assert s["w_down"].shape == (shared * F, D)
  else:
    assert "shared" not in params["params"]
  y, aux = apply(params, jnp.asarray(x))
  _assert_aux_schema(aux, 4)
  y_ref, losses, metrics = _reference_layer(_np_params(params), x, cfg)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  for k, v in losses.items():
    np.testing.assert_allclose(np.asarray(aux["losses"][k]), v, rtol=1e-5,
                               atol=1e-6, err_msg=k)
  for k, v in metrics.items():
    np.testing.assert_allclose(np.asarray(aux["metrics"][k]), v, rtol=1e-5,
                               atol=1e-6, err_msg=k)


def test_init_structure_and_scale():
  cfg = _cfg(dispatch="dropless", shared=2, cf=4.0)
  layer, apply = _layer(cfg)
  x = jnp.asarray(_x(11))
  params = jax.jit(layer.init)(jax.random.key(0), x)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  f32 = jnp.float32
  assert shapes == {"params": {
      "router": {"w_gate": ((D, 4), f32)},
      "experts": {"w_gate": ((4, D, F), f32), "w_up": ((4, D, F), f32),
                  "w_down": ((4, F, D), f32)},
      "shared": {"w_gate": ((D, 2 * F), f32), "w_up": ((D, 2 * F), f32),
                 "w_down": ((2 * F, D), f32)}}}
  e = params["params"]["experts"]
  assert not np.allclose(np.asarray(e["w_gate"][0]), np.asarray(e["w_gate"][1]))
  y, aux = apply(params, x)
  y_ref, _, _ = _reference_layer(_np_params(params), np.asarray(x), cfg)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)


def test_shared_experts_add_a_dense_swiglu():
  x = _x(4)
  # The configs of test_layer_matches_numpy: no new compilation.
  cfg0 = _cfg(dispatch="dropless", cf=4.0)
  cfg2 = _cfg(dispatch="dropless", shared=2, cf=4.0)
  params2, apply2 = _init(cfg2, x, seed=5)
  _, apply0 = _layer(cfg0)
  params0 = {"params": {k: v for k, v in params2["params"].items()
                        if k != "shared"}}
  y2, aux2 = apply2(params2, jnp.asarray(x))
  y0, aux0 = apply0(params0, jnp.asarray(x))
  s = params2["params"]["shared"]
  dense = swiglu(jnp.asarray(x), s["w_gate"], s["w_up"], s["w_down"],
                 jnp.float32)
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y0 + dense),
                             rtol=1e-5, atol=1e-5)
  # Shared experts do not change routing.
  for k in LOSS_KEYS:
    np.testing.assert_array_equal(np.asarray(aux2["losses"][k]),
                                  np.asarray(aux0["losses"][k]))


@pytest.mark.parametrize("dispatch,shared,shared_hidden,gate", [
    ("dense", 1, 24, True),  # Qwen2-MoE: one gated shared expert of its own width
    ("dropless", 2, 0, True),  # width num_shared_experts * expert_hidden, gated
    ("dropless", 1, 40, False),  # DeepSeek-style: own width, ungated
])
def test_shared_width_and_gate_match_numpy(dispatch, shared, shared_hidden, gate):
  cfg = _cfg(dispatch=dispatch, shared=shared, cf=4.0, shared_hidden=shared_hidden,
             shared_gate=gate)
  x = _x(6)
  params, apply = _init(cfg, x, seed=7)
  p = params["params"]
  width = shared_hidden or shared * F
  assert p["shared"]["w_gate"].shape == (D, width) and p["shared"]["w_up"].shape == (D, width)
  assert p["shared"]["w_down"].shape == (width, D)
  assert ("shared_gate" in p) == gate
  if gate:
    assert p["shared_gate"]["w"].shape == (D, 1)
  y, aux = apply(params, jnp.asarray(x))
  _assert_aux_schema(aux, 4)
  y_ref, losses, _ = _reference_layer(_np_params(params), x, cfg)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  for k, v in losses.items():
    np.testing.assert_allclose(np.asarray(aux["losses"][k]), v, rtol=1e-5, atol=1e-6)


def test_shared_gate_scales_the_shared_output():
  """y = routed + sigmoid(x w_g) * shared(x): with w_g = 0 the shared output is halved."""
  x = _x(8)
  cfg_gate = _cfg(dispatch="dense", shared=1, cf=4.0, shared_hidden=24, shared_gate=True)
  params, apply = _init(cfg_gate, x, seed=9)
  cfg_plain = _cfg(dispatch="dense", shared=1, cf=4.0, shared_hidden=24)
  _, apply_plain = _layer(cfg_plain)
  plain = {"params": {k: v for k, v in params["params"].items() if k != "shared_gate"}}
  no_shared = {"params": {**plain["params"],
                          "shared": jax.tree.map(jnp.zeros_like, plain["params"]["shared"])}}
  routed, _ = apply_plain(no_shared, jnp.asarray(x))
  full, _ = apply_plain(plain, jnp.asarray(x))
  shared_out = np.asarray(full) - np.asarray(routed)
  w_g = np.asarray(params["params"]["shared_gate"]["w"], np.float64)
  gate_BxLx1 = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ w_g)))
  y, _ = apply(params, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), np.asarray(routed) + gate_BxLx1 * shared_out,
                             rtol=1e-5, atol=1e-5)
  zero = {"params": {**params["params"], "shared_gate": {"w": jnp.zeros((D, 1))}}}
  y0, _ = apply(zero, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y0), np.asarray(routed) + 0.5 * shared_out,
                             rtol=1e-5, atol=1e-5)
  init = jax.jit(_layer(cfg_gate)[0].init)(jax.random.key(0), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(init["params"]["shared_gate"]["w"]), 0.0)


def test_metrics_with_skewed_routing():
  # Positive inputs and a gate that ranks expert 3 first, expert 0 second for
  # every token: load = [1/2, 0, 0, 1/2], max/mean = 2, cv = 0.25 / 0.25 = 1;
  # experts 1 and 2 get nothing.
  cfg = _cfg(dispatch="dropless", cf=4.0)
  x = np.abs(_x(6))
  params, apply = _init(cfg, x)
  w_gate = np.zeros((D, 4), np.float32)
  w_gate[:, 3] = 1.0
  w_gate[:, 0] = 0.2
  params = {"params": {**params["params"],
                       "router": {"w_gate": jnp.asarray(w_gate)}}}
  y, aux = apply(params, jnp.asarray(x))
  m = aux["metrics"]
  np.testing.assert_allclose(np.asarray(m["load"]), [0.5, 0, 0, 0.5])
  np.testing.assert_allclose(float(m["load_max_over_mean"]), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(m["load_cv"]), 1.0, rtol=1e-6)
  y_ref, losses, metrics = _reference_layer(_np_params(params), x, cfg)
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  for k, v in metrics.items():
    np.testing.assert_allclose(np.asarray(m[k]), v, rtol=1e-5, atol=1e-6,
                               err_msg=k)
  for k, v in losses.items():
    np.testing.assert_allclose(np.asarray(aux["losses"][k]), v, rtol=1e-5,
                               err_msg=k)


def test_bfloat16_is_close_to_float32():
  cfg = _cfg(dispatch="dropless", shared=2, cf=4.0)
  x = _x(7)
  params, apply = _init(cfg, x)
  y32, aux32 = apply(params, jnp.asarray(x))
  _, apply16 = _layer(cfg, "bfloat16")
  y16, aux16 = apply16(params, jnp.asarray(x))
  assert y16.dtype == jnp.float32
  scale = float(np.max(np.abs(np.asarray(y32))))
  np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), rtol=0,
                             atol=3e-2 * max(scale, 1.0))
  assert np.max(np.abs(np.asarray(y16) - np.asarray(y32))) > 1e-6
  # Routing and its statistics stay float32 whatever the compute dtype.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b)), aux16, aux32)


def _grad_fn(cfg):
  layer = MoELayer(cfg)

  def loss(params, x, ct):
    y, aux, _ = layer.apply(params, x)
    return (jnp.sum(y * ct) + 0.1 * aux["losses"]["load_balance"]
            + 0.01 * aux["losses"]["z_loss"])

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_grad_dropless_equals_dense_and_single_expert_equals_swiglu():
  x = _x(8)
  ct = jnp.asarray(np.random.default_rng(9).standard_normal((B, L, D)),
                   jnp.float32)
  cfg_dense = _cfg(dispatch="dense", shared=1, cf=4.0)
  cfg_dl = _cfg(dispatch="dropless", shared=1, cf=4.0)
  params, _ = _init(cfg_dense, x)
  g_dense = _grad_fn(cfg_dense)(params, jnp.asarray(x), ct)
  g_dl = _grad_fn(cfg_dl)(params, jnp.asarray(x), ct)
  for path, a in jax.tree_util.tree_leaves_with_path(g_dense):
    assert np.all(np.isfinite(np.asarray(a))), path
  assert np.max(np.abs(np.asarray(g_dense[0]["params"]["router"]["w_gate"]))) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5), g_dense, g_dl)

  # E = 1: d/d(expert weights) and d/dx equal those of the dense SwiGLU.
  cfg1 = _cfg(e=1, k=1, dispatch="dropless")
  params1, _ = _init(cfg1, x)
  g_params, g_x = _grad_fn(cfg1)(params1, jnp.asarray(x), ct)
  w = params1["params"]["experts"]

  def dense_loss(wg, wu, wd, xx):
    return jnp.sum(swiglu(xx, wg, wu, wd, jnp.float32) * ct)

  gd = jax.grad(dense_loss, argnums=(0, 1, 2, 3))(
      w["w_gate"][0], w["w_up"][0], w["w_down"][0], jnp.asarray(x))
  # With one expert the router's weight is softmax over one logit == 1, so the
  # output does not depend on the gate; only the z-loss 0.01 * mean(logit^2)
  # pulls on it (the balance loss is the constant 1).
  x_TxD = np.asarray(x, np.float64).reshape(-1, D)
  w_gate = np.asarray(params1["params"]["router"]["w_gate"], np.float64)
  logits = x_TxD @ w_gate
  g_gate = 0.01 * 2 * x_TxD.T @ logits / (B * L)
  g_x_z = (0.01 * 2 * logits @ w_gate.T / (B * L)).reshape(B, L, D)
  ge = g_params["params"]["experts"]
  for got, want in ((ge["w_gate"][0], gd[0]), (ge["w_up"][0], gd[1]),
                    (ge["w_down"][0], gd[2]), (g_x, np.asarray(gd[3]) + g_x_z)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_params["params"]["router"]["w_gate"]),
                             g_gate, rtol=1e-4, atol=1e-6)


def test_jitter_only_in_training():
  c = default_config().moe
  c.num_experts, c.top_k, c.expert_hidden, c.dispatch = 4, 2, F, "dense"
  c.capacity_factor = 4.0
  c.topk.jitter = 0.1
  cfg = ml_collections.FrozenConfigDict(c)
  x = jnp.asarray(_x(10))
  params, _ = _init(cfg, x)
  layer = MoELayer(cfg)
  train = jax.jit(lambda *a, **kw: layer.apply(*a, deterministic=False, **kw)[:2])
  y1, _ = train(params, x, rngs={"router": jax.random.key(1)})
  y1b, _ = train(params, x, rngs={"router": jax.random.key(1)})
  y2, _ = train(params, x, rngs={"router": jax.random.key(2)})
  # Deterministic: same as the jitter-free layer (already compiled).
  _, apply_clean = _layer(_cfg(dispatch="dense", cf=4.0))
  y_det, _ = apply_clean(params, x)
  y_ref, _, _ = _reference_layer(_np_params(params), np.asarray(x), cfg)
  np.testing.assert_allclose(np.asarray(y_det), y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1b))
  assert np.max(np.abs(np.asarray(y1) - np.asarray(y_det))) > 1e-4
  assert np.max(np.abs(np.asarray(y1) - np.asarray(y2))) > 1e-4
  with pytest.raises(Exception, match="router"):
    train(params, x)


def test_load_metrics_with_no_valid_slot_are_finite():
  from moejax.moe.metrics import load_metrics  # noqa: PLC0415
  m = load_metrics(jnp.zeros(4))
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in m.values())
