"""ReLU router (ReMoE): routing math, the load-balanced L1, its adaptive coefficient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe import MoELayer
from moejax.moe.routers.relu import load_balanced_l1, relu_route, update_l1_coef
from moejax.moe.state import update_router_state
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config

LOGITS = jnp.array([[1.0, -0.5, 2.0],    # two positive gates
                    [-1.0, -2.0, -0.5],  # none: no expert at all
                    [0.5, 1.5, 3.0],     # three: the smallest overflows max_k=2
                    [-1.0, 0.25, -1.0]], jnp.float32)


def test_hand_computed_case():
  a, gates, overflow = relu_route(LOGITS, max_k=2)
  np.testing.assert_array_equal(a.token, [0, 1, 2, 3, 0, 1, 2, 3])
  valid = np.asarray(a.valid)
  np.testing.assert_array_equal(valid, [1, 0, 1, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(a.expert)[valid], [2, 2, 1, 0, 1])
  np.testing.assert_allclose(np.asarray(a.weight)[valid], [2.0, 3.0, 0.25, 1.0, 1.5])
  np.testing.assert_allclose(np.asarray(a.weight)[~valid], 0.0)  # no renormalisation
  np.testing.assert_allclose(overflow, 1 / 6, rtol=1e-6)  # 6 positive gates, 5 kept
  # f_e = E/(kT) * #active = 3/4 * 2 for every expert; mean gates .375 .4375 1.25.
  np.testing.assert_allclose(load_balanced_l1(gates, k=1), 1.5 * 2.0625, rtol=1e-6)
  g = jax.grad(lambda lg: load_balanced_l1(jax.nn.relu(lg), 1))(LOGITS)
  np.testing.assert_allclose(g, np.where(LOGITS > 0, 1.5 / 4, 0.0), rtol=1e-6)


def test_l1_coef_update():
  up = update_l1_coef(jnp.float32(1e-3), 6.0, 12.0, target=1 / 3, alpha=1.2)
  down = update_l1_coef(jnp.float32(1e-3), 3.0, 12.0, target=1 / 3, alpha=1.2)
  same = update_l1_coef(jnp.float32(1e-3), 4.0, 12.0, target=1 / 3, alpha=1.2)
  np.testing.assert_allclose([up, down, same], [1.2e-3, 1e-3 / 1.2, 1e-3], rtol=1e-6)


def _cfg(**kw):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = "relu", 3, 1, 8, "dense"
  c.relu.max_k = 2
  for k, v in kw.items():
    c[k] = v
  return c


def test_coefficient_is_pooled_over_layers():
  """One model-wide sparsity (ReMoE): layers' stats are summed before the update."""
  state = {"moe_layers": {"block0": {"moe": {"router": {"l1_coef": jnp.full((2,), 1e-3)}}}}}
  stats = {"active": jnp.array([6.0, 0.0]), "pairs": jnp.array([12.0, 12.0])}
  new = update_router_state(state, stats, _cfg())  # pooled: 6/24 < 1/3 -> down
  np.testing.assert_allclose(new["moe_layers"]["block0"]["moe"]["router"]["l1_coef"],
                             [1e-3 / 1.2] * 2, rtol=1e-6)


def test_layer_loss_metrics_and_stats():
  cfg = ml_collections.FrozenConfigDict(_cfg())
  x = jax.random.normal(jax.random.key(0), (1, 4, 5))
  layer = MoELayer(cfg)
  variables = layer.init(jax.random.key(1), x)
  assert float(variables["moe_state"]["router"]["l1_coef"]) == np.float32(1e-8)
  # Make the gate produce LOGITS: x = identity rows, w_gate = LOGITS^T padded.
  x = jnp.eye(4, 5)[None]
  w = jnp.zeros((5, 3)).at[:4].set(LOGITS)
  params = {**variables["params"], "router": {"w_gate": w}}
  state = {"router": {"l1_coef": jnp.float32(0.5)}}
  _, aux, _ = layer.apply({"params": params, "moe_state": state}, x)
  m, losses = aux["metrics"], aux["losses"]
  np.testing.assert_allclose(losses["relu_l1"], 0.5 * 1.5 * 2.0625, rtol=1e-5)
  assert float(losses["z_loss"]) == 0.0
  np.testing.assert_allclose(m["overflow_fraction"], 1 / 6, rtol=1e-6)
  np.testing.assert_allclose(m["l1_coef"], 0.5)
  np.testing.assert_allclose(m["experts_per_token"], 5 / 4)
  np.testing.assert_allclose(m["load"], [1 / 5, 2 / 5, 2 / 5], rtol=1e-6)
  np.testing.assert_allclose(aux["state_stats"]["active"], 6.0)
  np.testing.assert_allclose(aux["state_stats"]["pairs"], 12.0)


def test_adaptive_l1_reaches_k_experts_per_token():
  """Short training run on the default corpus: active experts per token -> k (10%)."""
  cfg = tiny_config(router="relu", num_experts=4, top_k=1)
  cfg.moe.relu.max_k = 4
  cfg.moe.relu.l1_init = 1e-4  # start nearer the useful range than ReMoE's 1e-8
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.lr = 300, 10, 1e-3
  tx = make_optimizer(cfg.train)
  state = trainer.init_state(cfg, tx)
  step = trainer.make_train_step(cfg, tx)
  batches = trainer.prepare(cfg).train_iterator(cfg.train.batch_size, cfg.seed)
  per_token, coef = [], []
  for _ in range(cfg.train.steps):
    b = next(batches)
    state, out = step(state, {"inputs": b["inputs"], "targets": b["targets"]})
    per_token.append(out["moe"]["experts_per_token"])
    coef.append(out["moe"]["l1_coef"])
  per_token = np.asarray(jax.device_get(per_token))  # [steps, MoE layers]
  coef = np.asarray(jax.device_get(coef))
  assert coef.max() > 100 * cfg.moe.relu.l1_init  # the L1 really was switched on
  np.testing.assert_array_equal(coef[:, 0], coef[:, 1])  # one model-wide lambda
  late = per_token[-100:].mean()
  assert abs(late - 1.0) < 0.1, late


@pytest.mark.parametrize("key,value,words", [
    ("relu.max_k", 5, ["moe.relu.max_k", "5", "moe.num_experts=4"]),
    ("relu.alpha", 1.0, ["moe.relu.alpha", "1.0", "> 1"]),
    ("relu.l1_init", 0.0, ["moe.relu.l1_init", "positive"]),
    ("sigmoid_bias.rate", -1.0, ["moe.sigmoid_bias.rate", "positive"]),
    ("recurrent.hidden", 0, ["moe.recurrent.hidden", "positive"]),
    ("soft.slots_per_expert", 0, ["moe.soft.slots_per_expert", "positive"]),
])
def test_config_validation_names_key_value_and_rule(key, value, words):
  cfg = tiny_config(router="relu")
  group, name = key.split(".")
  cfg.moe[group][name] = value
  with pytest.raises(ConfigError) as err:
    validate(cfg)
  for w in words:
    assert w in str(err.value), (w, str(err.value))
