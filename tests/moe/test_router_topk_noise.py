"""Noisy top-k gating (Shazeer et al. 2017): noise, importance and load losses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe.routers.topk import (NOISE_EPS, TopKRouter, cv_squared,
                                     load_probs)
from tests.conftest import tiny_config

from . import reference as ref


def _phi(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _cfg(e=4, k=2, noise="gaussian", imp=0.3, load=0.7, order="softmax_topk"):
  c = default_config().moe
  c.num_experts, c.top_k = e, k
  c.topk.noise, c.topk.importance_weight, c.topk.load_weight = noise, imp, load
  c.topk.order = order
  return ml_collections.FrozenConfigDict(c)


def test_cv_squared_by_hand():
  np.testing.assert_allclose(cv_squared(jnp.array([1.0, 3.0])), 0.25, rtol=1e-6)
  np.testing.assert_allclose(cv_squared(jnp.array([2.0, 2.0, 2.0])), 0.0, atol=1e-7)
  # [0, 0, 3]: mean 1, population variance (1 + 1 + 4) / 3 = 2.
  np.testing.assert_allclose(cv_squared(jnp.array([0.0, 0.0, 3.0])), 2.0, rtol=1e-6)
  assert float(cv_squared(jnp.array([5.0]))) == 0.0


def test_load_probs_by_hand():
  # k = 1, E = 3: noisy top-2 = (1.5, 0.2). Expert 0 is in the top-1, so its
  # threshold is the 2nd largest noisy logit 0.2; experts 1, 2 are out, so
  # theirs is the 1st largest, 1.5.
  clean = jnp.array([[1.0, 0.0, 0.0]])
  noisy = jnp.array([[1.5, 0.2, -0.3]])
  std = jnp.array([[1.0, 2.0, 0.5]])
  p = np.asarray(load_probs(clean, noisy, std, 1))
  np.testing.assert_allclose(p, [[_phi(0.8), _phi(-0.75), _phi(-3.0)]], rtol=1e-5)
  # k = E: always selected.
  np.testing.assert_array_equal(np.asarray(load_probs(clean, noisy, std, 3)), 1.0)


def test_importance_and_load_losses_by_hand():
  """Deterministic mode (noise-free logits): losses against formulas in NumPy."""
  t, d, e, k = 6, 5, 3, 1
  rng = np.random.default_rng(0)
  x = rng.standard_normal((t, d)).astype(np.float32)
  cfg = _cfg(e, k, imp=0.3, load=0.7)
  mod = TopKRouter(cfg)
  params = mod.init(jax.random.key(0), jnp.asarray(x), shape_BxL=(1, t))
  assert params["params"]["w_noise"].shape == (d, e)
  np.testing.assert_array_equal(params["params"]["w_noise"], 0.0)  # paper init
  w_noise = rng.standard_normal((d, e)).astype(np.float32)
  params = {"params": {**params["params"], "w_noise": jnp.asarray(w_noise)}}
  out = mod.apply(params, jnp.asarray(x), shape_BxL=(1, t))
  wg = np.asarray(params["params"]["w_gate"], np.float64)
  logits = x.astype(np.float64) @ wg
  std = np.log1p(np.exp(x.astype(np.float64) @ w_noise)) + NOISE_EPS
  tok, exp, wt, _ = ref.topk_route(logits, k, "softmax_topk", True)
  importance = np.zeros(e)
  for a in range(len(tok)):
    importance[exp[a]] += wt[a]
  load = np.zeros(e)
  for i in range(t):
    order = np.argsort(-logits[i], kind="stable")
    for j in range(e):
      thr = logits[i, order[k]] if j in order[:k] else logits[i, order[k - 1]]
      load[j] += _phi((logits[i, j] - thr) / std[i, j])
  cv2 = lambda v: np.var(v) / (np.mean(v) ** 2 + 1e-10)  # noqa: E731
  assert set(out.losses) == {"importance_loss", "load_loss"}
  # Reported unweighted; their declared weights are moe.topk.importance/load_weight.
  np.testing.assert_allclose(out.losses["importance_loss"], cv2(importance),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out.losses["load_loss"], cv2(load), rtol=1e-4,
                             atol=1e-7)
  assert {a.name: a.weight for a in TopKRouter.aux_losses(cfg)} == {
      "importance_loss": "moe.topk.importance_weight", "load_loss": "moe.topk.load_weight"}
  np.testing.assert_allclose(out.logits_TxE, logits, rtol=1e-5, atol=1e-6)


def test_training_noise_is_learned_scale_times_standard_normal():
  t, d, e = 256, 4, 4
  x = jnp.asarray(np.random.default_rng(1).standard_normal((t, d)), jnp.float32)
  mod = TopKRouter(_cfg(e, 2))
  params = mod.init(jax.random.key(0), x, shape_BxL=(1, t))

  @jax.jit
  def run(p, key):
    def losses(p):
      out = mod.apply(p, x, shape_BxL=(1, t), deterministic=False, rngs={"router": key})
      return out.losses["load_loss"] + out.losses["importance_loss"], out.logits_TxE
    return jax.grad(losses, has_aux=True)(p)

  g, a = run(params, jax.random.key(1))
  _, b = run(params, jax.random.key(1))
  _, c = run(params, jax.random.key(2))
  np.testing.assert_array_equal(a, b)  # same rng, same noise
  assert not np.allclose(a, c)
  clean = np.asarray(x, np.float64) @ np.asarray(params["params"]["w_gate"], np.float64)
  z = (np.asarray(a, np.float64) - clean) / (math.log(2.0) + NOISE_EPS)  # w_noise = 0
  assert abs(np.mean(z)) < 0.1 and abs(np.std(z) - 1.0) < 0.1
  # Gradients reach w_noise (through the noisy logits and the load loss).
  g = g["params"]
  assert np.all(np.isfinite(g["w_noise"])) and np.any(np.asarray(g["w_noise"]) != 0)
  assert np.any(np.asarray(g["w_gate"]) != 0)


def test_noise_none_has_no_noise_params_or_losses():
  x = jnp.ones((3, 4))
  mod = TopKRouter(_cfg(noise="none"))
  params = mod.init(jax.random.key(0), x, shape_BxL=(1, 3))
  assert set(params["params"]) == {"w_gate"}
  out = mod.apply(params, x, shape_BxL=(1, 3), deterministic=False)  # no rng needed
  assert out.losses == {}
  assert TopKRouter.param_count(_cfg(noise="none"), 4) == 16
  assert TopKRouter.param_count(_cfg(noise="gaussian"), 4) == 32


@pytest.mark.parametrize("key,value,words", [
    ("noise", "uniform", ["moe.topk.noise", "'uniform'", "gaussian"]),
    ("importance_weight", -1.0, ["moe.topk.importance_weight", "non-negative"]),
    ("load_weight", -0.5, ["moe.topk.load_weight", "non-negative"]),
])
def test_config_validation(key, value, words):
  cfg = tiny_config()
  cfg.moe.topk[key] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value)
