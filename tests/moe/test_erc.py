"""The expert-router coupling loss (moejax/moe/erc.py): noise bounds, proxies, the margin
loss and the families' activation norms against NumPy loops, the loss in the MoE layer
(both families, gradients to router and experts, quantized experts), counts, checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe import erc
from moejax.moe.experts import LatentExperts, MLPExperts, SwiGLUExperts
from moejax.moe.layer import aux_losses
from moejax.moe.routers import ROUTERS, get_router
from moejax.validation import validate
from tests.conftest import tiny_config

E, D, F = 4, 8, 16


def bounds_reference(r_ExD, noise) -> np.ndarray:
  r = np.asarray(r_ExD, np.float64)
  out = np.zeros(len(r))
  for i in range(len(r)):
    nearest = min((np.linalg.norm(r[i] - r[j]) for j in range(len(r)) if j != i),
                  default=math.inf)
    out[i] = min(noise, nearest / (2 * np.linalg.norm(r[i])))
  return out


def coupling_reference(m_ExE, alpha) -> float:
  m = np.asarray(m_ExE, np.float64)
  n = len(m)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i != j:
        total += max(m[i, j] - alpha * m[i, i], 0.0) + max(m[j, i] - alpha * m[i, i], 0.0)
  return total / n ** 2


def norms_reference(x_NxD, w_in_ExDxF, b_in_ExF=None) -> np.ndarray:
  x, w = np.asarray(x_NxD, np.float64), np.asarray(w_in_ExDxF, np.float64)
  out = np.zeros((len(x), len(w)))
  for n in range(len(x)):
    for e in range(len(w)):
      h = x[n] @ w[e] + (0.0 if b_in_ExF is None else np.asarray(b_in_ExF, np.float64)[e])
      out[n, e] = math.sqrt(sum(v * v for v in h))
  return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), e=st.integers(1, 6), noise=st.floats(0.0, 1.0),
       scale=st.floats(0.1, 5.0))
def test_proxies_stay_in_their_cluster(seed, e, noise, scale):
  r = (np.random.default_rng(seed).standard_normal((e, D)) * scale).astype(np.float32)
  eps = np.asarray(erc.noise_bounds(jnp.asarray(r), noise))
  np.testing.assert_allclose(eps, bounds_reference(r, noise), rtol=1e-5, atol=1e-7)
  prox = np.asarray(erc.proxy_tokens(jnp.asarray(r), jax.random.key(seed), noise), np.float64)
  r64 = r.astype(np.float64)
  delta = np.where(r64 != 0, prox / np.where(r64 != 0, r64, 1.0), 1.0)
  assert np.all(np.abs(delta - 1.0) <= eps[:, None] * (1 + 1e-5) + 1e-6)  # U(1-eps, 1+eps)
  for i in range(e):  # a proxy is at least as close to its own embedding as to any other
    own = np.linalg.norm(prox[i] - r64[i])
    for j in range(e):
      if j != i:
        assert own <= np.linalg.norm(prox[i] - r64[j]) * (1 + 1e-5) + 1e-6
  np.testing.assert_array_equal(np.asarray(erc.proxy_tokens(jnp.asarray(r), None, noise)), r)
  np.testing.assert_array_equal(
      np.asarray(erc.proxy_tokens(jnp.asarray(r), jax.random.key(1), 0.0)), r)


def test_noise_is_drawn_and_spread():
  r = jnp.asarray(np.random.default_rng(0).standard_normal((E, 64)), jnp.float32)
  eps = np.asarray(erc.noise_bounds(r, 1.0))
  a = np.asarray(erc.proxy_tokens(r, jax.random.key(0), 1.0)) / np.asarray(r) - 1.0
  b = np.asarray(erc.proxy_tokens(r, jax.random.key(1), 1.0)) / np.asarray(r) - 1.0
  assert not np.allclose(a, b)  # fresh per key
  assert np.all(np.max(np.abs(a), axis=1) > 0.8 * eps)  # uses the width it may
  assert np.all(np.abs(np.mean(a / eps[:, None], axis=1)) < 0.25)  # centred on 1


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), e=st.integers(1, 6), alpha=st.floats(0.0, 1.0))
def test_coupling_loss_matches_reference(seed, e, alpha):
  m = np.abs(np.random.default_rng(seed).standard_normal((e, e))).astype(np.float32) * 3
  got = float(erc.coupling_loss(jnp.asarray(m), alpha))
  np.testing.assert_allclose(got, coupling_reference(m, alpha), rtol=1e-5, atol=1e-7)
  assert got >= 0
  dominant = (10.0 * np.eye(e) + 0.1).astype(np.float32)  # off-diagonals 0.1, diagonal 10.1
  if alpha > 0.05:  # both constraints hold everywhere
    assert float(erc.coupling_loss(jnp.asarray(dominant), alpha)) == 0.0


def test_coupling_loss_by_hand():
  m = np.array([[2.0, 1.5, 3.0], [1.0, 1.0, 0.5], [0.0, 2.5, 2.0]], np.float32)
  # alpha = 1: row i = 0: M[0, 2] = 3 > 2 (+1); column: nothing above 2.
  # i = 1: row: nothing above 1; column M[0, 1] = 1.5 (+0.5), M[2, 1] = 2.5 (+1.5).
  # i = 2: row: M[2, 1] = 2.5 (+0.5); column M[0, 2] = 3 (+1).
  np.testing.assert_allclose(float(erc.coupling_loss(jnp.asarray(m), 1.0)),
                             (1 + 0.5 + 1.5 + 0.5 + 1) / 9, rtol=1e-6)


@pytest.mark.parametrize("family", [SwiGLUExperts(), MLPExperts("relu", True),
                                    MLPExperts("gelu", False), LatentExperts(3)],
                         ids=["swiglu", "mlp-bias", "mlp", "latent"])
def test_activation_norms_match_reference(family):
  rng = np.random.default_rng(1)
  w = {k: jnp.asarray(rng.standard_normal(leaf.shape(E, D, F)), jnp.float32)
       for k, leaf in family.leaves().items()}
  x = jnp.asarray(rng.standard_normal((5, D)), jnp.float32)
  got = np.asarray(family.activation_norms(w, x, jnp.float32))
  if isinstance(family, SwiGLUExperts):
    want = norms_reference(x, w["w_gate"])
  elif isinstance(family, LatentExperts):  # W_gate[e] = A_gate B_gate[e]
    want = norms_reference(x, np.einsum("dr,erf->edf", w["a_gate"], w["b_gate"]))
  else:
    want = norms_reference(x, w["w_in"], w["b_in"] if family.bias else None)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  bf16 = np.asarray(family.activation_norms(w, x, jnp.bfloat16))
  assert bf16.dtype == np.float32 and not np.array_equal(bf16, got)  # the compute dtype
  np.testing.assert_allclose(bf16, want, rtol=0.05)


def _moe_cfg(expert="swiglu", router="topk", **erc_opts):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = router, E, 2, F, "dense"
  c.expert, c.mlp.bias = expert, True
  c.erc.weight = 0.5
  for k, v in erc_opts.items():
    c.erc[k] = v
  return ml_collections.FrozenConfigDict(c)


def _layer(cfg, seed=0):
  layer = MoELayer(cfg)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 3, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 256, (2, 3)), jnp.int32)
  return layer, x, ids, layer.init(jax.random.key(seed), x, token_ids_BxL=ids)


@pytest.mark.parametrize("expert", ["swiglu", "mlp"])
def test_layer_loss_matches_reference(expert):
  cfg = _moe_cfg(expert, alpha=0.8)
  layer, x, ids, variables = _layer(cfg)
  _, aux, _ = layer.apply(variables, x, token_ids_BxL=ids)  # eval: the clean embeddings
  p = jax.tree.map(np.asarray, variables["params"])
  r = p["router"]["w_gate"].T  # [E, D]: the gate's columns
  ex = p["experts"]
  m = (norms_reference(r, ex["w_gate"]) if expert == "swiglu"
       else norms_reference(r, ex["w_in"], ex["b_in"]))
  np.testing.assert_allclose(float(aux["losses"]["erc_loss"]), coupling_reference(m, 0.8),
                             rtol=1e-5, atol=1e-7)
  full = default_config()
  full.moe = ml_collections.ConfigDict(cfg.to_dict())
  assert ("erc_loss", "moe.erc.weight") in [(a.name, a.weight) for a in aux_losses(full)]


def test_gradients_reach_the_gate_and_the_experts_input_projection():
  cfg = _moe_cfg(alpha=0.5)  # strict: many constraints active
  layer, x, ids, variables = _layer(cfg, seed=2)

  def loss(params, key):
    _, aux, _ = layer.apply({"params": params}, x, token_ids_BxL=ids, deterministic=False,
                            rngs={"router": key})
    return aux["losses"]["erc_loss"]

  key = jax.random.key(3)
  value, g = jax.value_and_grad(loss)(variables["params"], key)
  assert float(value) > 0
  assert np.any(np.asarray(g["router"]["w_gate"]) != 0)
  assert np.any(np.asarray(g["experts"]["w_gate"]) != 0)
  for leaf in ("w_up", "w_down"):  # only the projection the SiLU reads is measured
    assert not np.any(np.asarray(g["experts"][leaf]))
  # training noise changes the loss; without noise training equals evaluation
  _, aux_eval, _ = layer.apply(variables, x, token_ids_BxL=ids)
  assert float(value) != float(aux_eval["losses"]["erc_loss"])
  quiet = _moe_cfg(alpha=0.5, noise=0.0)
  quiet_layer = MoELayer(quiet)
  _, aux_q, _ = quiet_layer.apply(variables, x, token_ids_BxL=ids, deterministic=False,
                                  rngs={"router": key})
  np.testing.assert_allclose(float(aux_q["losses"]["erc_loss"]),
                             float(aux_eval["losses"]["erc_loss"]), rtol=1e-6)


def test_off_reports_nothing():
  cfg = _moe_cfg(weight=0.0)
  layer, x, ids, variables = _layer(cfg)
  _, aux, _ = layer.apply(variables, x, token_ids_BxL=ids)
  assert "erc_loss" not in aux["losses"] and erc.aux_losses(cfg) == ()


def test_in_the_model_with_quantized_experts_and_counts():
  """ERC trains with the dequantized experts of a quantized run; it adds no parameters."""
  cfg = tiny_config()
  cfg.moe.erc.weight = 0.1
  validate(cfg)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  assert lm.param_counts(cfg)["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  assert lm.param_counts(cfg) == lm.param_counts(tiny_config())
  cfg.moe.quant.scheme, cfg.moe.quant.experts8 = "sym", cfg.moe.num_experts
  validate(cfg)
  variables = lm.init(jax.random.key(0), cfg)
  assert "quant" in variables  # the expert matrices are packed codes, not parameters
  ids = jax.random.randint(jax.random.key(1), (2, cfg.train.seq_len), 0, 256)

  def loss(params):
    _, aux = lm.apply({**variables, "params": params}, ids, cfg, rng=jax.random.key(2))
    return jnp.sum(aux["losses"]["erc_loss"])

  value, g = jax.value_and_grad(loss)(variables["params"])
  assert np.isfinite(float(value)) and float(value) > 0
  assert np.any(np.asarray(g["moe_layers"]["block0"]["moe"]["router"]["w_gate"]) != 0)


def test_every_gate_router_declares_its_embedding():
  without = sorted(n for n, cls in ROUTERS.items()
                   if cls.expert_embedding(default_config().moe) is None)
  assert without == ["hash", "recurrent", "soft", "thor"]


@pytest.mark.parametrize("key,value,words", [
    ("moe.erc.weight", -0.1, ["moe.erc.weight", "-0.1", ">= 0"]),
    ("moe.erc.alpha", 1.5, ["moe.erc.alpha", "1.5", "[0, 1]"]),
    ("moe.erc.alpha", -0.1, ["moe.erc.alpha", "-0.1", "[0, 1]"]),
    ("moe.erc.noise", 2.0, ["moe.erc.noise", "2.0", "[0, 1]"]),
    ("moe.erc.noise", -0.5, ["moe.erc.noise", "-0.5", "[0, 1]"]),
])
def test_bad_values_are_rejected(key, value, words):
  cfg = tiny_config()
  cfg.moe.erc.weight = 0.1
  validate(cfg)
  cfg.moe.erc[key.rsplit(".", 1)[1]] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("router", ["hash", "soft", "recurrent", "thor"])
def test_routers_without_embeddings_are_rejected(router):
  assert get_router(router).expert_embedding(default_config().moe) is None
  cfg = tiny_config(router=router)
  validate(cfg)
  cfg.moe.erc.weight = 0.1
  with pytest.raises(ConfigError, match=f"moe.erc.weight=0.1.*moe.router='{router}' has none"):
    validate(cfg)


def test_merged_experts_are_rejected():
  cfg = tiny_config()
  cfg.moe.num_router_experts = 8
  validate(cfg)
  cfg.moe.erc.weight = 0.1
  with pytest.raises(ConfigError, match="moe.erc.weight=0.1.*moe.num_router_experts=0"):
    validate(cfg)
