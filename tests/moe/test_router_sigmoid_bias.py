"""Auxiliary-loss-free sigmoid router: routing math, bias updates and their schedules, trainer."""

from __future__ import annotations

import json
import math
import os

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
from moejax.moe.routers.sigmoid_bias import (SCHEDULES, UPDATES, SigmoidBiasRouter,
                                             sigmoid_bias_route, step_size, update_bias)
from moejax.train import trainer
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer
from moejax.validation import validate
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


# --- renormalize and DeepSeek-V3 group-limited selection ---------------------------------

def _ref_route(logits, bias, k, scaling=1.0, renormalize=True, num_groups=1, top_groups=1):
  """DeepSeek-V3's routing (HF DeepseekV3TopkRouter), token by token in NumPy float64.

  scores = sigmoid(logits); corrected = scores + bias; group score = sum of the top-2
  corrected scores of the group (top-1 for one-expert groups); keep the top_groups best
  groups; top-k experts of the kept groups by corrected score; weights = the *uncorrected*
  scores of those experts, / their sum if renormalize, x routed scaling. Ties: lower index.
  Returns (experts [T, k], weights [T, k]) in descending corrected score.
  """
  logits = np.asarray(logits, np.float64)
  t, e = logits.shape
  size = e // num_groups
  experts, weights = np.zeros((t, k), np.int64), np.zeros((t, k))
  for i in range(t):
    scores = 1.0 / (1.0 + np.exp(-logits[i]))
    corrected = scores + np.asarray(bias, np.float64)
    allowed = np.ones(e, bool)
    if num_groups > 1:
      group_score = [sum(sorted(corrected[g * size:(g + 1) * size])[-2:])
                     for g in range(num_groups)]
      kept = np.argsort(-np.array(group_score), kind="stable")[:top_groups]
      allowed = np.array([j // size in kept for j in range(e)])
    order = [j for j in np.argsort(-corrected, kind="stable") if allowed[j]]
    idx = np.array(order[:k])
    w = scores[idx]
    if renormalize:
      w = w / w.sum()
    experts[i], weights[i] = idx, w * scaling
  return experts, weights


def _unpack(a, t, k):
  """Choice-major slots -> [T, k] experts and weights."""
  return (np.asarray(a.expert).reshape(k, t).T, np.asarray(a.weight).reshape(k, t).T)


def test_group_limited_hand_computed():
  """E=6 in 3 groups of 2. Token 0: group scores (corrected) .9+.8, .95+.1, .5+.4 -> with
  top_groups=1 only group 0, although expert 2 has the best score. The bias lifts group 2."""
  scores = np.array([[0.9, 0.8, 0.95, 0.1, 0.5, 0.4]])
  logits = jnp.asarray(np.log(scores / (1 - scores)), jnp.float32)
  a, _ = sigmoid_bias_route(logits, jnp.zeros(6), k=2, num_groups=3, top_groups=1)
  e, w = _unpack(a, 1, 2)
  np.testing.assert_array_equal(e, [[0, 1]])
  np.testing.assert_allclose(w, [[0.9 / 1.7, 0.8 / 1.7]], rtol=1e-5)
  # Two groups kept: {0, 1}; expert 2 (.95) now wins, then expert 0.
  a, _ = sigmoid_bias_route(logits, jnp.zeros(6), k=2, num_groups=3, top_groups=2)
  np.testing.assert_array_equal(_unpack(a, 1, 2)[0], [[2, 0]])
  # A bias of +1 on expert 5 makes group 2 the best (0.5 + 1.4); its weights stay unbiased.
  bias = jnp.array([0, 0, 0, 0, 0, 1.0])
  a, _ = sigmoid_bias_route(logits, bias, k=2, num_groups=3, top_groups=1, renormalize=False,
                            routed_scaling=2.5)
  e, w = _unpack(a, 1, 2)
  np.testing.assert_array_equal(e, [[5, 4]])
  np.testing.assert_allclose(w, [[2.5 * 0.4, 2.5 * 0.5]], rtol=1e-5)


def test_group_score_is_top2_sum_not_max():
  """Group 0 has the single best expert, group 1 the best top-2 sum: group 1 is kept."""
  scores = np.array([[0.99, 0.01, 0.7, 0.7]])
  logits = jnp.asarray(np.log(scores / (1 - scores)), jnp.float32)
  a, _ = sigmoid_bias_route(logits, jnp.zeros(4), k=1, num_groups=2, top_groups=1)
  assert int(a.expert[0]) in (2, 3)


@st.composite
def _routing_case(draw):
  num_groups = draw(st.sampled_from([1, 2, 3, 4]))
  size = draw(st.integers(1, 4))
  top_groups = draw(st.integers(1, num_groups))
  k = draw(st.integers(1, top_groups * size))
  return dict(t=draw(st.integers(1, 6)), e=num_groups * size, k=k, num_groups=num_groups,
              top_groups=top_groups, renormalize=draw(st.booleans()),
              scaling=draw(st.sampled_from([1.0, 2.5])), seed=draw(st.integers(0, 2**16)))


_jit_route = jax.jit(sigmoid_bias_route, static_argnums=(2, 3, 4, 5, 6))


@settings(derandomize=True, deadline=None, max_examples=25)
@given(case=_routing_case())
def test_route_matches_deepseek_v3_reference(case):
  rng = np.random.default_rng(case["seed"])
  t, e, k = case["t"], case["e"], case["k"]
  logits = rng.standard_normal((t, e)).astype(np.float32) * 2
  bias = (rng.standard_normal(e) * 0.3).astype(np.float32)
  a, probs = _jit_route(jnp.asarray(logits), jnp.asarray(bias), k, case["scaling"],
                        case["renormalize"], case["num_groups"], case["top_groups"])
  want_e, want_w = _ref_route(logits, bias, k, case["scaling"], case["renormalize"],
                              case["num_groups"], case["top_groups"])
  got_e, got_w = _unpack(a, t, k)
  np.testing.assert_array_equal(got_e, want_e)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(a.token), np.tile(np.arange(t), k))
  assert bool(jnp.all(a.valid))
  size = e // case["num_groups"]  # every pick lies in at most top_groups groups
  assert all(len(set(row // size)) <= case["top_groups"] for row in got_e)
  if case["renormalize"]:
    np.testing.assert_allclose(got_w.sum(1), case["scaling"], rtol=1e-5)
  sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
  np.testing.assert_allclose(probs, sig / sig.sum(1, keepdims=True), rtol=1e-5)


def test_one_group_is_plain_selection():
  """num_groups=1 (and top_groups=1) is the ungrouped router, for any bias."""
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(8) * 0.5, jnp.float32)
  a0, _ = sigmoid_bias_route(logits, bias, 3)
  a1, _ = sigmoid_bias_route(logits, bias, 3, num_groups=1, top_groups=1)
  np.testing.assert_array_equal(a0.expert, a1.expert)
  np.testing.assert_array_equal(a0.weight, a1.weight)


def test_grouped_bias_gets_no_gradient_and_weights_do():
  logits = jnp.asarray(np.random.default_rng(8).standard_normal((3, 6)), jnp.float32)

  def total(lg, bias):
    a, _ = sigmoid_bias_route(lg, bias, 2, num_groups=3, top_groups=2, renormalize=False)
    return jnp.sum(a.weight)

  np.testing.assert_array_equal(jax.grad(total, 1)(logits, jnp.zeros(6)), 0.0)
  assert float(jnp.sum(jnp.abs(jax.grad(total, 0)(logits, jnp.zeros(6))))) > 0


def test_layer_reads_group_options():
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = (
      "sigmoid_bias", 6, 2, 8, "dense")
  c.sigmoid_bias.num_groups, c.sigmoid_bias.top_groups = 3, 1
  c.sigmoid_bias.renormalize, c.sigmoid_bias.routed_scaling = False, 2.0
  cfg = ml_collections.FrozenConfigDict(c)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  layer = MoELayer(cfg)
  variables = layer.init(jax.random.key(1), x)
  variables = {**variables, "moe_state": {"router": {"bias": jnp.arange(6.0) * 0.1}}}
  _, aux, _ = layer.apply(variables, x)
  counts = np.asarray(aux["state_stats"]["counts"])
  # Each token's two picks lie in one group: per group, the counts sum to a multiple of 2.
  assert counts.sum() == 12 and all(counts.reshape(3, 2).sum(1) % 2 == 0)
  logits = np.asarray(x).reshape(6, 8) @ np.asarray(variables["params"]["router"]["w_gate"])
  e_ref, _ = _ref_route(logits, np.arange(6.0) * 0.1, 2, 2.0, False, 3, 1)
  np.testing.assert_array_equal(counts, np.bincount(e_ref.ravel(), minlength=6))


# --- the primal-dual reading: update rules and step-size schedules -----------------------

def _sb_moe(**opts):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = (
      "sigmoid_bias", 4, 2, 8, "dense")
  for key, value in opts.items():
    c.sigmoid_bias[key] = value
  return ml_collections.FrozenConfigDict(c)


def _rule_before_schedules(bias, counts, rate):
  """bias + rate * sign(mean load - load) in NumPy float32: the update every run had so far."""
  counts = np.asarray(counts, np.float32)
  return np.asarray(bias, np.float32) + np.float32(rate) * np.sign(counts.mean() - counts)


def test_default_update_is_unchanged_exactly():
  cfg = _sb_moe()
  assert cfg.sigmoid_bias.update_rule == "sign" and cfg.sigmoid_bias.schedule == "constant"
  cls = SigmoidBiasRouter
  assert cls.state_names(cfg) == ("bias",)
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  assert set(layer.init(jax.random.key(1), x)["moe_state"]["router"]) == {"bias"}
  rng = np.random.default_rng(0)
  state = {"bias": jnp.asarray(rng.standard_normal(4) * 0.01, jnp.float32)}
  want = np.asarray(state["bias"])
  update = jax.jit(lambda s, st: cls.update_state(s, st, cfg))
  for _ in range(20):
    counts = rng.integers(0, 9, 4).astype(np.float32)
    state = update(state, {"counts": jnp.asarray(counts)})
    want = _rule_before_schedules(want, counts, cfg.sigmoid_bias.rate)
    np.testing.assert_array_equal(np.asarray(state["bias"]), want)
  assert set(state) == {"bias"}


def _ref_updates(counts_NxE, rate, rule, schedule):
  """The bias after each update n = 1..N, in NumPy float64."""
  bias = np.zeros(counts_NxE.shape[1])
  for n, counts in enumerate(counts_NxE.astype(np.float64), start=1):
    step = rate * {"constant": 1.0, "inv_sqrt": 1 / np.sqrt(n), "inv": 1 / n}[schedule]
    mean = counts.mean()
    bias = bias + step * (np.sign(mean - counts) if rule == "sign" else (mean - counts) / mean)
  return bias


@settings(derandomize=True, deadline=None, max_examples=20)
@given(rule=st.sampled_from(UPDATES), schedule=st.sampled_from(SCHEDULES),
       rate=st.sampled_from([1e-3, 0.05, 0.5]), steps=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_rules_and_schedules_match_reference(rule, schedule, rate, steps, seed):
  cfg = _sb_moe(update_rule=rule, schedule=schedule, rate=rate)
  cls = SigmoidBiasRouter
  assert cls.state_names(cfg) == (("bias",) if schedule == "constant" else ("bias", "updates"))
  counts = np.random.default_rng(seed).integers(1, 20, (steps, 4))
  state = {"bias": jnp.zeros(4)}
  if schedule != "constant":
    state["updates"] = jnp.zeros((), jnp.int32)
  for row in counts:
    state = cls.update_state(state, {"counts": jnp.asarray(row, jnp.float32)}, cfg)
  np.testing.assert_allclose(np.asarray(state["bias"]), _ref_updates(counts, rate, rule, schedule),
                             rtol=1e-5, atol=1e-7)
  if schedule != "constant":
    assert state["updates"].dtype == jnp.int32 and int(state["updates"]) == steps


def test_proportional_rule_and_step_sizes_hand_computed():
  # counts [2 3 3], mean 8/3: relative errors (8/3 - c) / (8/3) = [1/4, -1/8, -1/8].
  np.testing.assert_allclose(update_bias(jnp.zeros(3), jnp.array([2.0, 3, 3]), 0.1,
                                         "proportional"), [0.025, -0.0125, -0.0125], rtol=1e-6)
  np.testing.assert_allclose([float(step_size(0.2, n, "inv_sqrt")) for n in (1, 4, 16)],
                             [0.2, 0.1, 0.05], rtol=1e-6)
  np.testing.assert_allclose([float(step_size(0.2, n, "inv")) for n in (1, 4, 16)],
                             [0.2, 0.05, 0.0125], rtol=1e-6)
  assert float(step_size(0.2, 7, "constant")) == np.float32(0.2)
  # The second update (one stored) with the 1/n schedule: half the rate.
  cfg = _sb_moe(update_rule="sign", schedule="inv", rate=0.1)
  new = SigmoidBiasRouter.update_state({"bias": jnp.zeros(3), "updates": jnp.asarray(1)},
                                       {"counts": jnp.array([2.0, 3, 3])}, cfg)
  np.testing.assert_allclose(new["bias"], [0.05, -0.05, -0.05], rtol=1e-6)
  assert int(new["updates"]) == 2


@pytest.mark.parametrize("rule,schedule,rate", [("sign", "inv_sqrt", 0.05),
                                                ("proportional", "constant", 5e-3),
                                                ("proportional", "inv_sqrt", 0.05)])
def test_other_rules_balance_skewed_load(rule, schedule, rate):
  """Like the default rule (test_bias_updates_balance_skewed_load): 300 updates bring the
  load CV below 1/4 of its start."""
  t, e, k, steps = 512, 8, 2, 300
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((t, e)) + np.linspace(2.5, -2.5, e), jnp.float32)
  cfg = _sb_moe(update_rule=rule, schedule=schedule, rate=rate)

  def counts_of(bias):
    return sigmoid_bias_route(logits, bias, k)[0].expert_counts(e)

  def step(_, s):
    return SigmoidBiasRouter.update_state(s, {"counts": counts_of(s["bias"])}, cfg)

  state = {"bias": jnp.zeros(e)}
  if schedule != "constant":
    state["updates"] = jnp.zeros((), jnp.int32)
  final = jax.jit(lambda s: jax.lax.fori_loop(0, steps, step, s))(state)
  cv0, cv1 = _cv(counts_of(jnp.zeros(e))), _cv(counts_of(final["bias"]))
  assert cv1 < cv0 / 4, (cv0, cv1)


def test_layer_and_trainer_keep_the_update_count(tmp_path):
  cfg = tiny_config(router="sigmoid_bias")
  cfg.moe.sigmoid_bias.update_rule, cfg.moe.sigmoid_bias.schedule = "proportional", "inv"
  cfg.moe.sigmoid_bias.rate = 0.05
  cfg.train.steps = cfg.train.checkpoint_every = cfg.train.eval_every = 3
  cfg.train.warmup_steps, cfg.train.log_every, cfg.train.eval_batches = 1, 3, 1
  variables = jax.eval_shape(lambda key: lm.init(key, cfg), jax.random.key(0))
  node = variables["moe_state"]["moe_layers"]["block0"]["moe"]["router"]
  assert node["updates"].shape == (2,) and node["updates"].dtype == jnp.int32
  workdir = str(tmp_path)
  trainer.train(cfg, workdir)
  ckpt = Checkpointer(workdir, 3)
  _, state, _ = ckpt.restore_latest(trainer.init_state(cfg, make_optimizer(cfg.train)))
  ckpt.close()
  router = state["collections"]["moe_state"]["moe_layers"]["block0"]["moe"]["router"]
  np.testing.assert_array_equal(np.asarray(router["updates"]), [3, 3])
  assert np.all(np.isfinite(router["bias"])) and np.linalg.norm(router["bias"]) > 0


@pytest.mark.parametrize("key,value", [("update_rule", "adam"), ("schedule", "cosine")])
def test_bad_rule_or_schedule_is_rejected(key, value):
  cfg = default_config()
  cfg.moe.router = "sigmoid_bias"
  cfg.moe.sigmoid_bias[key] = value
  with pytest.raises(ConfigError, match=rf"moe.sigmoid_bias.{key}='{value}' .*allowed: \["):
    validate(cfg)
