"""Routing capture: agrees with the routing the training step uses, for every router."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax import schedules
from moejax import analysis
from moejax import model as lm
from moejax.analysis import routing as routing_lib
from moejax.moe import MoELayer
from moejax.moe.routers import ROUTERS
from moejax.train import data as data_lib
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config

# Options that make each router's training routing deterministic and exercised.
ROUTER_OPTIONS = {"top_p": {"top_p.p": 0.5, "top_p.max_k": 3},
                  "null_experts": {"null_experts.num_null": 4},
                  "relu": {"relu.max_k": 4}}


def _cfg(router: str, **extra):
  c = tiny_config(router=router)
  c.model.num_layers = 3  # two MoE layers with moe.every = 1 and one leading dense layer
  c.moe.first_dense_layers = 1
  for key, value in {**ROUTER_OPTIONS.get(router, {}), **extra}.items():
    node = c.moe
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _variables(cfg, seed=0):
  return lm.init(jax.random.key(seed), cfg)


def _ids(cfg, seed=1):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (cfg.train.batch_size, cfg.train.seq_len)).astype(np.int32)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_routing_conversion_matches_training_forward(router):
  """For every router: the routing an MoE layer sows in training mode (the mode of the
  train step's loss), converted by capture's `dense_routing`, has the load, experts per
  token, null fraction and top-1 probability that the same layer call reports as
  metrics. (One compiled call of the layer alone; the model path is tested below.)"""
  cfg = _cfg(router)
  layer = MoELayer(ml_collections.FrozenConfigDict(cfg.moe))
  ids = _ids(cfg)
  b, l = ids.shape
  x = jnp.asarray(np.random.default_rng(5).standard_normal((b, l, 32)), jnp.float32)
  key = jax.random.key(0)
  scheds = schedules.all_schedules(cfg)  # a scheduled router's values at step 0
  shared = {schedules.SCHEDULE: schedules.values(scheds, 0)} if scheds else None
  (_, aux, _), variables = jax.jit(lambda x, i: layer.init_with_output(
      {"params": key, "router": key}, x, token_ids_BxL=i, deterministic=False,
      shared=shared, mutable=True))(x, jnp.asarray(ids))
  sown = jax.tree.map(lambda a: np.asarray(a)[None],  # one layer: N = 1
                      jax.device_get(variables["intermediates"]["routing"][0]))
  w, sel, probs, disp = routing_lib.dense_routing(sown, b, l, 4, cfg.moe.top_k)
  r = analysis.make_routing(sel, w, token_ids_BxL=ids, probs_NxBxLxC=probs)
  m = jax.device_get(aux["metrics"])
  t = ids.size
  if router == "soft":
    # Combine mass per expert is the router's probs_TxE; every token mixes all experts.
    np.testing.assert_allclose(w, probs, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(r.experts_per_token() == cfg.moe.top_k)
    # Dispatch mass of each expert sums to slots_per_expert within each position group.
    np.testing.assert_allclose(disp.sum(1), cfg.moe.soft.slots_per_expert, atol=1e-5)
  else:
    assert disp is None
    np.testing.assert_allclose(analysis.load.expert_load(r)[0], m["load"], atol=1e-6)
    np.testing.assert_allclose(r.experts_per_token().mean(), m["experts_per_token"], atol=1e-6)
    if router == "null_experts":
      np.testing.assert_allclose(1.0 - sel.sum() / (t * cfg.moe.top_k), m["null_fraction"],
                                 atol=1e-6)
  if probs is not None:
    np.testing.assert_allclose(probs.reshape(t, -1).max(-1).mean(), m["top1_prob"], atol=1e-6)


def test_capture_matches_the_train_step():
  """The jitted train step's own per-layer load / experts-per-token on a batch equal
  the capture of the parameters it was given on that batch (top-p: a variable
  number of experts per token; MoE layers 1 and 2 after a dense layer 0)."""
  cfg = _cfg("top_p")
  tx = make_optimizer(cfg.train)
  state = trainer.init_state(cfg, tx)
  ids = _ids(cfg, seed=3)
  r = analysis.capture(analysis.Model(cfg, {"params": state["params"],
                                            **state["collections"]}), ids)
  step = trainer.make_train_step(cfg, tx)
  _, out = step(state, {"inputs": jnp.asarray(ids), "targets": jnp.asarray(ids)})
  moe = jax.device_get(out["moe"])
  np.testing.assert_allclose(analysis.load.expert_load(r), moe["load"], atol=1e-6)
  np.testing.assert_allclose(r.experts_per_token().reshape(2, -1).mean(-1),
                             moe["experts_per_token"], atol=1e-6)


def test_topk_capture_matches_an_independent_router_computation():
  """Top-k selections and weights from the router input (the ffn_norm output, taken with
  flax capture_intermediates) and the gate weights, recomputed in NumPy float64."""
  cfg = _cfg("topk")
  variables = _variables(cfg, seed=2)
  ids = _ids(cfg, seed=4)
  r = analysis.capture(analysis.Model(cfg, variables), ids)
  model = lm.make_model(cfg)
  _, inter = model.apply(variables, jnp.asarray(ids), mutable=["intermediates"],
                         capture_intermediates=lambda mdl, _: mdl.name == "ffn_norm")
  x_NxBxLxD = np.asarray(inter["intermediates"]["moe_layers"]["block0"]["ffn_norm"]["__call__"][0],
                         np.float64)
  w_NxDxE = np.asarray(variables["params"]["moe_layers"]["block0"]["moe"]["router"]["w_gate"],
                       np.float64)
  logits = np.einsum("nbld,nde->nble", x_NxBxLxD, w_NxDxE)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, axis=-1, kind="stable")[..., :cfg.moe.top_k]
  want = np.zeros(p.shape, bool)
  np.put_along_axis(want, top, True, axis=-1)
  np.testing.assert_array_equal(r.selected_NxBxLxE, want)
  w = np.where(want, p, 0.0)
  if cfg.moe.topk.renormalize:
    w = w / w.sum(-1, keepdims=True)
  np.testing.assert_allclose(r.weights_NxBxLxE, w, atol=1e-5)


def test_capture_texts_domains_padding_and_layers():
  cfg = _cfg("top_p")
  model = analysis.Model(cfg, _variables(cfg))
  texts = ["In the beginning God created the heaven and the earth.", "Jesus wept."]
  r = analysis.capture(model, texts, domains=["Genesis", "John"], layers=[2])
  # 54 + 2 tokens -> 4 rows of 16; 11 + 2 -> 1 row; masked EOS padding after each text.
  assert r.token_ids_BxL.shape == (5, 16) and r.layers == [2]
  assert r.mask_BxL.sum() == sum(len(x.encode()) + 2 for x in texts) == 56 + 13
  assert r.domain_names == ["Genesis", "John"] and r.domain_B.tolist() == [0, 0, 0, 0, 1]
  assert r.token_ids_BxL[0, 0] == 256 and r.token_ids_BxL[4, 12] == 257
  whole = analysis.capture(model, texts)
  np.testing.assert_array_equal(whole.selected_NxBxLxE[1], r.selected_NxBxLxE[0])
  dom = analysis.specialization.domain_specialization(r)
  assert dom["ratio"].shape == (1, 2, 4)


def test_capture_rejects_bad_arguments():
  cfg = _cfg("topk")
  model = analysis.Model(cfg, _variables(cfg))
  with pytest.raises(ValueError, match=r"layers=\[0\]"):
    analysis.capture(model, _ids(cfg), layers=[0])
  with pytest.raises(ValueError, match="data='test'"):
    analysis.capture(model, "test")
  with pytest.raises(ValueError, match="domains is given"):
    analysis.capture(model, _ids(cfg), domains=["a"])
  with pytest.raises(ValueError, match="domains has 1 entries for 2 texts"):
    analysis.capture(model, ["a", "b"], domains=["x"])
  with pytest.raises(ValueError, match="token ids must lie in"):
    analysis.capture(model, np.full((2, 4), 999))
  with pytest.raises(ValueError, match="num_batches=0"):
    analysis.capture(model, "val", num_batches=0)
  dense = _cfg("topk")
  dense.moe.enabled = False
  with pytest.raises(ValueError, match="no MoE layer"):
    analysis.capture(analysis.Model(dense, lm.init(jax.random.key(0), dense)), _ids(dense))


def test_load_model_and_capture_a_run(tiny_run):
  r4 = analysis.capture(tiny_run, "val")
  assert r4.step == 4 and r4.domain_B is not None and len(r4.domain_names) == 66
  assert r4.token_ids_BxL.shape == (4, 16)
  r2 = analysis.capture(f"{tiny_run}/checkpoints/2", "val")
  assert r2.step == 2
  np.testing.assert_array_equal(r2.token_ids_BxL, r4.token_ids_BxL)
  np.testing.assert_array_equal(analysis.capture(tiny_run, "val", step=2).selected_NxBxLxE,
                                r2.selected_NxBxLxE)
  train = analysis.capture(tiny_run, "train", num_batches=2)
  assert train.token_ids_BxL.shape == (8, 16)
  with pytest.raises(ValueError, match="step=3 has no checkpoint"):
    analysis.capture(tiny_run, "val", step=3)
  with pytest.raises(ValueError, match="not a run directory"):
    analysis.load_model(f"{tiny_run}/checkpoints")


def test_trainer_logs_routing_metrics_at_each_eval(tiny_run):
  rows = [json.loads(x) for x in open(f"{tiny_run}/metrics.jsonl")]
  routing = [r for r in rows if any(k.startswith("routing/") for k in r)]
  assert [r["step"] for r in routing] == [2, 4]
  for layer in (0, 1):
    for row in routing:
      assert row[f"routing/layer{layer}/load_cv"] >= 0
      assert 0 <= row[f"routing/layer{layer}/coactivation_density"] <= 1
    assert f"routing/layer{layer}/saturation_prev" not in routing[0]
    assert 0 <= routing[1][f"routing/layer{layer}/saturation_prev"] <= 1
  # The logged numbers are the online metrics of the checkpoints on the first val batch.
  cfg = analysis.load_model(tiny_run).cfg
  data = data_lib.make_data(cfg.data.path, cfg.train.seq_len, cfg.data.val_fraction, cfg.seed)
  ids = data.val_batches(cfg.train.batch_size, 1)[0]["inputs"]
  r4 = analysis.capture(tiny_run, ids)
  r2 = analysis.capture(tiny_run, ids, step=2)
  want = analysis.online.routing_metrics(r4, r2)
  for k, v in want.items():
    assert routing[1][k] == pytest.approx(v, abs=1e-6), k
