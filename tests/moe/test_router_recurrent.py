"""Layerwise recurrent router (RMoE): GRU step, carry, shared weights, model wiring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model as lm
from moejax.config import default_config
from moejax.moe.routers.recurrent import RecurrentRouter, gru_cell
from tests.conftest import tiny_config


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_gru_cell_matches_numpy():
  rng = np.random.default_rng(0)
  r, t = 3, 2
  p = {"w_ih": rng.standard_normal((r, 3 * r)), "w_hh": rng.standard_normal((r, 3 * r)),
       "b_ih": rng.standard_normal(3 * r), "b_hh": rng.standard_normal(3 * r)}
  x, h = rng.standard_normal((t, r)), rng.standard_normal((t, r))
  out = gru_cell(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p),
                 jnp.asarray(x, jnp.float32), jnp.asarray(h, jnp.float32))
  for i in range(t):  # token by token, gate by gate
    wi = lambda g: x[i] @ p["w_ih"][:, g * r:(g + 1) * r] + p["b_ih"][g * r:(g + 1) * r]
    wh = lambda g: h[i] @ p["w_hh"][:, g * r:(g + 1) * r] + p["b_hh"][g * r:(g + 1) * r]
    reset, update = _sigmoid(wi(0) + wh(0)), _sigmoid(wi(1) + wh(1))
    new = np.tanh(wi(2) + reset * wh(2))
    np.testing.assert_allclose(out[i], (1 - update) * new + update * h[i], rtol=1e-5,
                               atol=1e-6)
  # Hand case: all-zero weights give r = z = 1/2, n = 0, so h' = h / 2.
  zero = jax.tree.map(jnp.zeros_like, p)
  np.testing.assert_allclose(gru_cell(zero, jnp.ones((1, r)), jnp.full((1, r), 4.0)),
                             np.full((1, r), 2.0))


def _router_cfg():
  c = default_config().moe
  c.router, c.num_experts, c.top_k = "recurrent", 4, 2
  c.recurrent.hidden = 8
  return ml_collections.FrozenConfigDict(c)


def test_carry_changes_routing():
  """The state from the previous layer changes this layer's logits and experts."""
  cfg = _router_cfg()
  router = RecurrentRouter(cfg)
  x = jax.random.normal(jax.random.key(0), (6, 16))
  kw = dict(shape_BxL=(1, 6))
  variables = router.init(jax.random.key(1), x, **kw)
  shared = variables["params"]
  shared = {k: shared[f"router_gru_{k}"] for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
  a = router.apply(variables, x, carry=jnp.zeros((6, 8)), shared=shared, **kw)
  b = router.apply(variables, x, carry=3.0 * jax.random.normal(jax.random.key(2), (6, 8)),
                   shared=shared, **kw)
  assert a.carry.shape == (6, 8) and a.assignment.num_slots == 12
  assert not np.allclose(a.logits_TxE, b.logits_TxE)
  assert not np.array_equal(a.assignment.expert, b.assignment.expert)


def _ids(cfg, seed=0):
  return jax.random.randint(jax.random.key(seed), (2, cfg.train.seq_len), 0, 256)


def _model_cfg():
  cfg = tiny_config(router="recurrent")
  cfg.moe.recurrent.hidden = 8
  return cfg


def test_shared_params_and_per_layer_projections():
  cfg = _model_cfg()
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  assert p["router_gru_w_ih"].shape == (8, 24) and p["router_gru_b_hh"].shape == (24,)
  router = p["moe_layers"]["block0"]["moe"]["router"]
  assert router["w_in"].shape == (2, 32, 8)  # scanned: one per MoE layer
  assert router["w_out"].shape == (2, 8, 4)
  assert not any(k.startswith("router_gru") for k in router)


def test_gradients_reach_shared_gru_from_every_layer():
  cfg = _model_cfg()
  cfg.moe.dispatch = "dense"  # jacrev vmaps the backward pass; keep it plain XLA
  variables = lm.init(jax.random.key(0), cfg)
  ids = _ids(cfg)
  model = lm.make_model(cfg)

  def z_losses(params):  # [MoE layers]
    _, aux = model.apply({"params": params}, ids)
    return aux["losses"]["z_loss"]

  g = jax.jit(jax.jacrev(z_losses))(variables["params"])  # leaves [layers, ...]
  for i in range(2):
    assert float(jnp.abs(g["router_gru_w_ih"][i]).sum()) > 0, i
    assert float(jnp.abs(g["router_gru_b_hh"][i]).sum()) > 0, i
  # Only the second layer sees a nonzero previous state, so only it reaches w_hh.
  assert float(jnp.abs(g["router_gru_w_hh"][0]).sum()) == 0
  assert float(jnp.abs(g["router_gru_w_hh"][1]).sum()) > 0


def test_remat_same_values_and_grads():
  cfg = _model_cfg()
  cfg.moe.dispatch = "dense"  # cheaper to compile; the router path is the same
  variables = lm.init(jax.random.key(0), cfg)
  ids = _ids(cfg)

  def loss(params, c):
    logits, aux = lm.make_model(c).apply({"params": params}, ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.sum(aux["losses"]["z_loss"])

  g1 = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"],
                                                   ml_collections.FrozenConfigDict(cfg))
  cfg.model.remat = True
  g2 = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"],
                                                   ml_collections.FrozenConfigDict(cfg))
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


# Decoder causality: tests/moe/test_router_contract.py (every router).
