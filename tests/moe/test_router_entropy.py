"""The router-entropy loss (moejax/moe/router_entropy.py): Tsallis and Shannon against a
NumPy reference, its limits and gradients, the MoE layer reporting it for every router
with probabilities, the sign convention of its weight, and the config checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import aux_losses as aux_lib
from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe import router_entropy as ent
from moejax.moe.layer import aux_losses
from moejax.moe.metrics import mean_entropy
from moejax.moe.routers import ROUTERS, get_router
from moejax.validation import validate
from tests.conftest import tiny_config


def tsallis_reference(p_TxC, q) -> float:
  """Mean over tokens of (1 - sum p^q) / (q - 1), or -sum p log p at q = 1 (float64 loops;
  each row renormalised in float64, as float32 probabilities sum to 1 only to rounding)."""
  total = 0.0
  for row in np.asarray(p_TxC, np.float64):
    row = row / sum(row)
    if q == 1.0:
      total += -sum(v * math.log(v) for v in row if v > 0)
    else:
      total += (1.0 - sum(v ** q for v in row if v > 0)) / (q - 1.0)
  return total / len(p_TxC)


def _probs(seed, t=5, c=6, zeros=True):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(c, 0.5), size=t)
  if zeros:
    p[0] = 0.0
    p[0, seed % c] = 1.0  # a one-hot token
    p[1, : c // 2] = 0.0  # some zeros, never all
    p[1] /= p[1].sum()
  return p.astype(np.float32)


@pytest.mark.parametrize("q", [0.3, 0.5, 1.1, 2.0, 3.0])
def test_tsallis_matches_the_reference(q):
  p = _probs(0)
  got = float(ent.entropy_loss(jnp.asarray(p), "tsallis", q))
  np.testing.assert_allclose(got, tsallis_reference(p, q), rtol=2e-5, atol=1e-6)


def test_shannon_is_the_metric_function():
  p = _probs(1)
  want = tsallis_reference(p, 1.0)
  for got in (ent.entropy_loss(jnp.asarray(p), "shannon", 2.0),  # q is ignored
              ent.entropy_loss(jnp.asarray(p), "tsallis", 1.0), mean_entropy(jnp.asarray(p))):
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="Shannon"):
    ent.tsallis_entropy(jnp.asarray(p), 1.0)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), q=st.floats(0.05, 5.0), c=st.integers(2, 9))
def test_tsallis_properties(seed, q, c):
  if abs(q - 1.0) < 1e-3:
    q = 1.5
  p = _probs(seed, c=c)
  s_T = np.asarray(ent.tsallis_entropy(jnp.asarray(p), q))
  ref = [tsallis_reference(p[t:t + 1], q) for t in range(len(p))]
  np.testing.assert_allclose(s_T, ref, rtol=1e-4, atol=1e-6)
  uniform_max = (1.0 - c ** (1.0 - q)) / (q - 1.0)  # the uniform distribution's S_q
  assert np.all(s_T >= -1e-6) and np.all(s_T <= uniform_max * (1 + 1e-5) + 1e-6)
  assert abs(s_T[0]) < 1e-6  # a one-hot token has no entropy
  np.testing.assert_allclose(float(ent.tsallis_entropy(jnp.full((1, c), 1.0 / c), q)[0]),
                             uniform_max, rtol=1e-4)


@pytest.mark.parametrize("dq", [1e-4, -1e-4, 1e-2])
def test_q_to_one_is_shannon_without_cancellation(dq):
  p = _probs(2, zeros=False)
  shannon = tsallis_reference(p, 1.0)
  got = float(ent.entropy_loss(jnp.asarray(p), "tsallis", 1.0 + dq))
  np.testing.assert_allclose(got, tsallis_reference(p, 1.0 + dq), rtol=1e-5)
  np.testing.assert_allclose(got, shannon, rtol=3 * abs(dq) * math.log(6))


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_gradients_are_finite_with_zero_probabilities(q):
  logits = jnp.asarray(np.log(np.maximum(_probs(3), 1e-45)))
  logits = logits.at[0].set(jnp.asarray([0.0, -1e9, -1e9, -1e9, -1e9, -1e9]))
  g = jax.grad(lambda z: ent.entropy_loss(jax.nn.softmax(z), "tsallis", q))(logits)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.any(np.asarray(g) != 0)


def _moe_cfg(router, kind="tsallis", q=2.0, weight=0.5):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = router, 4, 2, 16, "dense"
  c.router_entropy.kind, c.router_entropy.q, c.router_entropy.weight = kind, q, weight
  return ml_collections.FrozenConfigDict(c)


def _inputs():
  rng = np.random.default_rng(4)
  return (jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32),
          jnp.asarray(rng.integers(0, 256, (2, 4)), jnp.int32))


WITH_PROBS = sorted(n for n, cls in ROUTERS.items() if cls.returns_probs)


def test_every_router_with_probabilities_is_covered():
  assert set(ROUTERS) - set(WITH_PROBS) == {"hash", "thor"}


@pytest.mark.parametrize("router", WITH_PROBS)
def test_layer_reports_it_for_every_router_with_probabilities(router):
  cfg = _moe_cfg(router)
  layer = MoELayer(cfg)
  x, ids = _inputs()
  variables = layer.init(jax.random.key(0), x, token_ids_BxL=ids)
  (_, aux, _), inter = layer.apply(variables, x, token_ids_BxL=ids,
                                   mutable=["intermediates"])
  probs = inter["intermediates"]["routing"][0]["probs_TxE"]
  np.testing.assert_allclose(float(aux["losses"]["router_entropy_loss"]),
                             tsallis_reference(probs, 2.0), rtol=1e-5, atol=1e-7)
  full = default_config()
  full.moe = ml_collections.ConfigDict(cfg.to_dict())
  assert ("router_entropy_loss", "moe.router_entropy.weight") in [
      (a.name, a.weight) for a in aux_losses(full)]


def test_no_loss_when_off():
  cfg = _moe_cfg("topk", kind="none")
  layer = MoELayer(cfg)
  x, ids = _inputs()
  variables = layer.init(jax.random.key(0), x, token_ids_BxL=ids)
  _, aux, _ = layer.apply(variables, x, token_ids_BxL=ids)
  assert "router_entropy_loss" not in aux["losses"]
  assert ent.aux_losses(cfg) == ()


@pytest.mark.parametrize("weight", [0.5, -0.5])
def test_sign_convention(weight):
  """Gradient descent on the weighted loss lowers the entropy for weight > 0 (sharpens)
  and raises it for weight < 0 (spreads)."""
  cfg = _moe_cfg("topk", q=1.5, weight=weight)
  full = tiny_config()
  full.moe = ml_collections.ConfigDict(cfg.to_dict())
  full.moe.aux_loss_weight = full.moe.z_loss_weight = 0.0  # only this loss is weighted
  specs = {a.name: a for a in aux_losses(full)}
  layer = MoELayer(cfg)
  x, ids = _inputs()
  variables = layer.init(jax.random.key(1), x, token_ids_BxL=ids)

  def objective(params):
    _, aux, _ = layer.apply({"params": params}, x, token_ids_BxL=ids)
    return (aux_lib.total({k: v[None] for k, v in aux["losses"].items()}, specs, full),
            aux["losses"]["router_entropy_loss"])

  params = variables["params"]
  (_, before), g = jax.value_and_grad(objective, has_aux=True)(params)
  params = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
  _, after = objective(params)
  assert (after < before - 1e-4) if weight > 0 else (after > before + 1e-4), (before, after)


@pytest.mark.parametrize("key,value,words", [
    ("moe.router_entropy.kind", "renyi", ["moe.router_entropy.kind", "'renyi'", "tsallis"]),
    ("moe.router_entropy.q", 0.0, ["moe.router_entropy.q", "0.0", "> 0"]),
    ("moe.router_entropy.q", -1.0, ["moe.router_entropy.q", "-1.0", "> 0"]),
    ("moe.router_entropy.q", float("inf"), ["moe.router_entropy.q", "inf", "finite"]),
    ("moe.router_entropy.weight", float("nan"), ["moe.router_entropy.weight", "nan",
                                                  "finite"]),
])
def test_bad_values_are_rejected(key, value, words):
  cfg = tiny_config()
  cfg.moe.router_entropy.kind = "tsallis"
  cfg.moe.router_entropy.weight = -0.1  # a negative weight is allowed (maximises)
  validate(cfg)
  section, name = key.rsplit(".", 1)
  cfg.moe.router_entropy[name] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("router", ["hash", "thor"])
def test_routers_without_probabilities_are_rejected(router):
  assert not get_router(router).returns_probs
  cfg = tiny_config(router=router)
  validate(cfg)
  cfg.moe.router_entropy.kind = "shannon"
  with pytest.raises(ConfigError, match=f"moe.router_entropy.kind='shannon'.*"
                                        f"moe.router='{router}' returns none"):
    validate(cfg)
