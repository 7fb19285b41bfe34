"""Auxiliary-loss-free sigmoid router: routing math, bias updates, trainer wiring."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe.routers.sigmoid_bias import sigmoid_bias_route, update_bias
from moejax.train import trainer
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config

L3, L9 = math.log(3.0), math.log(9.0)  # sigmoid: 0.75, 0.9; negated: 0.25, 0.1


def test_hand_computed_case():
  # scores: t0 [.75 .5 .25], t1 [.5 .75 .5], t2 [.9 .75 .1], t3 [.25 .75 .5];
  # bias [0 0 .6] lifts expert 2 into every token's pick except t2's.
  logits = jnp.array([[L3, 0, -L3], [0, L3, 0], [L9, L3, -L9], [-L3, L3, 0]],
                     jnp.float32)
  a, probs = sigmoid_bias_route(logits, jnp.array([0.0, 0.0, 0.6]), k=2,
                                routed_scaling=2.0)
  np.testing.assert_array_equal(a.token, [0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(a.expert, [2, 2, 0, 2, 0, 1, 1, 1])
  # Unbiased scores of the chosen pair, normalised, times 2.
  np.testing.assert_allclose(
      a.weight, [0.5, 0.8, 1.8 / 1.65, 0.8, 1.5, 1.2, 1.5 / 1.65, 1.2], rtol=1e-5)
  assert bool(jnp.all(a.valid))
  np.testing.assert_allclose(probs[0], [0.5, 1 / 3, 1 / 6], rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-6)
  counts = a.expert_counts(3)
  np.testing.assert_array_equal(counts, [2, 3, 3])
  # mean load 8/3: expert 0 is under it (+rate), experts 1 and 2 over (-rate).
  np.testing.assert_allclose(update_bias(jnp.array([0.0, 0.0, 0.6]), counts, 0.1),
                             [0.1, -0.1, 0.5], rtol=1e-6)


def test_bias_changes_selection_not_weights_gradient():
  logits = jnp.array([[L3, 0, -L3]], jnp.float32)

  def f(lg, bias):
    a, _ = sigmoid_bias_route(lg, bias, k=1)
    return jnp.sum(a.weight), a.expert

  _, e0 = f(logits, jnp.zeros(3))
  _, e1 = f(logits, jnp.array([0.0, 0.0, 1.0]))
  assert int(e0[0]) == 0 and int(e1[0]) == 2
  g = jax.grad(lambda b: f(logits, b)[0])(jnp.zeros(3))
  np.testing.assert_array_equal(g, 0.0)  # the bias gets no gradient


def _cv(counts):
  counts = np.asarray(counts, np.float64)
  return counts.std() / counts.mean()


def test_bias_updates_balance_skewed_load():
  """A few hundred updates bring the load CV below 1/4 of its start."""
  t, e, k, rate, steps = 512, 8, 2, 5e-3, 300
  rng = np.random.default_rng(0)
  skew = np.linspace(2.5, -2.5, e)  # expert 0 is strongly preferred
  logits = jnp.asarray(rng.standard_normal((t, e)) + skew, jnp.float32)

  def counts_of(bias):
    a, _ = sigmoid_bias_route(logits, bias, k)
    return a.expert_counts(e)

  @jax.jit
  def run(bias):
    return jax.lax.fori_loop(0, steps, lambda _, b: update_bias(b, counts_of(b), rate), bias)

  bias0 = jnp.zeros(e)
  cv0 = _cv(counts_of(bias0))
  bias = run(bias0)
  cv1 = _cv(counts_of(bias))
  assert cv0 > 0.5
  assert cv1 < cv0 / 4, (cv0, cv1)


def test_layer_reports_stats_and_bias_norm():
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = (
      "sigmoid_bias", 4, 2, 8, "dense")
  cfg = ml_collections.FrozenConfigDict(c)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  layer = MoELayer(cfg)
  variables = layer.init(jax.random.key(1), x)
  np.testing.assert_array_equal(variables["moe_state"]["router"]["bias"], 0.0)
  variables = {**variables, "moe_state": {"router": {"bias": jnp.array([3.0, 0, 0, 4.0])}}}
  _, aux, _ = layer.apply(variables, x)
  assert float(aux["metrics"]["bias_norm"]) == 5.0
  counts = aux["state_stats"]["counts"]
  assert counts.shape == (4,) and float(jnp.sum(counts)) == 2 * 3 * 2
  assert float(counts[0]) == 6 and float(counts[3]) == 6  # the bias picks 0 and 3
  assert float(aux["losses"]["z_loss"]) == 0.0


def test_trainer_updates_checkpoints_and_logs_bias(tmp_path):
  cfg = tiny_config(router="sigmoid_bias")
  cfg.moe.sigmoid_bias.rate = 0.01
  cfg.train.steps = cfg.train.checkpoint_every = cfg.train.eval_every = 6
  cfg.train.warmup_steps, cfg.train.log_every, cfg.train.eval_batches = 2, 3, 1
  workdir = str(tmp_path)
  trainer.train(cfg, workdir)
  tx = make_optimizer(cfg.train)
  ckpt = Checkpointer(workdir, 3)
  step, state, _ = ckpt.restore_latest(trainer.init_state(cfg, tx))
  ckpt.close()
  assert step == 6
  bias = np.asarray(state["collections"]["moe_state"]["moe_layers"]["block0"]["moe"]
                    ["router"]["bias"])
  assert bias.shape == (2, 4)  # [MoE layers, experts]
  assert np.linalg.norm(bias) > 0
  # Each update moves every entry by exactly +-rate: a multiple of the rate.
  np.testing.assert_allclose(np.round(bias / 0.01), bias / 0.01, atol=1e-3)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f]
  logged = [r["moe/layer1/bias_norm"] for r in rows if "moe/layer1/bias_norm" in r]
  assert logged and logged[0] == 0.0 and logged[-1] > 0.0  # step 1 sees the zero init
