"""THOR stochastic experts: random routing against a NumPy reference, the two inference
modes, the symmetric KL, the two-pass train step (plain, micro-batches, distillation)
reproduced pass by pass, the real trainer, counting and the config checks."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.aux_losses import total as aux_total
from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.layout import layer_plan
from moejax.model.counting import training_passes
from moejax.model.transformer import aux_losses as declared_aux_losses
from moejax.moe import MoELayer
from moejax.moe.routers.base import symmetric_kl
from moejax.moe.routers.thor import ThorRouter, average_route, random_experts, stochastic_route
from moejax.train import distill, trainer
from moejax.train.optimizer import make_optimizer
from moejax.validation import validate
from tests.conftest import tiny_config
from tests.moe import reference as ref
from tests.moe.test_router_hash import _py_hash_experts

T, D, F, E, K = 6, 8, 16, 4, 2


def _reference_picks(u_TxE: np.ndarray, k: int) -> np.ndarray:
  """The k largest uniforms of each token, largest first (a per-token loop)."""
  out = np.zeros((u_TxE.shape[0], k), np.int64)
  for t, row in enumerate(np.asarray(u_TxE, np.float64)):
    order = sorted(range(len(row)), key=lambda e: -row[e])
    out[t] = order[:k]
  return out


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 9), e=st.integers(1, 7),
       data=st.data())
def test_random_experts_match_reference_and_are_distinct(seed, t, e, data):
  k = data.draw(st.integers(1, e))
  key = jax.random.key(seed)
  got = np.asarray(random_experts(key, t, e, k))
  u = np.asarray(jax.random.uniform(key, (t, e), jnp.float32))  # the same draw
  np.testing.assert_array_equal(got, _reference_picks(u, k))
  assert got.dtype == np.int32 and got.min() >= 0 and got.max() < e
  assert all(len(set(row)) == k for row in got.tolist())


def test_random_experts_are_uniform_and_fresh_per_key():
  picks = np.asarray(random_experts(jax.random.key(0), 4000, E, 1))[:, 0]
  counts = np.bincount(picks, minlength=E)
  assert np.all(np.abs(counts - 1000) < 150), counts  # 5.5 sigma of Binomial(4000, 1/4)
  pairs = np.asarray(random_experts(jax.random.key(1), 6000, E, 2))
  pair_counts = np.bincount(pairs[:, 0] * E + pairs[:, 1], minlength=E * E).reshape(E, E)
  assert np.all(np.diag(pair_counts) == 0)  # distinct
  off = pair_counts[~np.eye(E, dtype=bool)]
  assert np.all(np.abs(off - 500) < 120), pair_counts  # 12 ordered pairs, 1/12 each
  again = np.asarray(random_experts(jax.random.key(2), 4000, E, 1))[:, 0]
  assert np.mean(again == picks) < 0.3  # an independent draw (chance agreement: 1/4)


def test_route_layouts():
  a = stochastic_route(jax.random.key(3), T, E, K)
  e_TxK = np.asarray(random_experts(jax.random.key(3), T, E, K))
  np.testing.assert_array_equal(a.token, np.tile(np.arange(T), K))  # choice-major
  np.testing.assert_array_equal(a.expert, e_TxK.T.reshape(-1))
  np.testing.assert_allclose(a.weight, 1.0 / K)
  assert np.asarray(a.valid).all()
  avg = average_route(T, E)
  for slot in range(T * E):  # slot e * T + t: token t, expert e, weight 1/E
    assert (int(avg.token[slot]), int(avg.expert[slot])) == (slot % T, slot // T)
  np.testing.assert_allclose(avg.weight, 1.0 / E)
  np.testing.assert_allclose(np.asarray(avg.combine_matrix(T, E)), 1.0 / E)


def _moe_cfg(inference="average", k=K):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = "thor", E, k, F, "dense"
  c.thor.inference = inference
  return ml_collections.FrozenConfigDict(c)


def _layer_case(inference, seed=0):
  cfg = _moe_cfg(inference)
  layer = MoELayer(cfg)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 3, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 300, (2, 3)), jnp.int32)
  variables = layer.init(jax.random.key(seed), x, token_ids_BxL=ids)
  return cfg, layer, x, ids, variables


@pytest.mark.parametrize("inference", ["average", "single"])
def test_inference_output_matches_reference(inference):
  cfg, layer, x, ids, variables = _layer_case(inference)
  assert "router" not in variables["params"]  # no router parameters
  y, aux, _ = layer.apply(variables, x, token_ids_BxL=ids)
  w = jax.tree.map(np.asarray, variables["params"]["experts"])
  x_TxD, ids_T = np.asarray(x).reshape(-1, D), np.asarray(ids).reshape(-1)
  want = np.zeros_like(x_TxD, np.float64)
  for t in range(x_TxD.shape[0]):  # per token: the mean of all experts, or the hashed one
    experts = range(E) if inference == "average" else _py_hash_experts(int(ids_T[t]), E, 1, 0)
    for e in experts:
      want[t] += ref.swiglu(x_TxD[t], w["w_gate"][e], w["w_up"][e], w["w_down"][e]) / len(
          experts)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  assert float(aux["metrics"]["experts_per_token"]) == (E if inference == "average" else 1)
  assert sorted(aux["losses"]) == ["load_balance", "z_loss"]
  assert all(float(v) == 0.0 for v in aux["losses"].values())  # no router scores


def test_training_output_matches_reference_on_its_random_experts():
  cfg, layer, x, ids, variables = _layer_case("average", seed=1)
  run = lambda key: layer.apply(variables, x, token_ids_BxL=ids, deterministic=False,  # noqa
                                rngs={"router": key}, mutable=["intermediates"])
  (y, aux, _), inter = run(jax.random.key(4))
  a = inter["intermediates"]["routing"][0]["assignment"]
  tok, exp = np.asarray(a.token), np.asarray(a.expert)
  e_TxK = exp.reshape(K, -1).T
  assert all(len(set(row)) == K for row in e_TxK.tolist())
  w = jax.tree.map(np.asarray, variables["params"]["experts"])
  want = ref.moe(np.asarray(x).reshape(-1, D), tok, exp, np.asarray(a.weight),
                 np.asarray(a.valid), w)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  assert float(aux["metrics"]["experts_per_token"]) == K
  (_, _, _), inter2 = run(jax.random.key(5))
  assert not np.array_equal(np.asarray(inter2["intermediates"]["routing"][0]["assignment"]
                                       .expert), exp)  # another rng, other experts


def _sym_kl_reference(a, b, w=None) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = np.ones(a.shape[:2]) if w is None else np.asarray(w, np.float64)
  total = 0.0
  for i in range(a.shape[0]):
    for j in range(a.shape[1]):
      pa, pb = ref.softmax(a[i, j]), ref.softmax(b[i, j])
      kl_ab = sum(pa[v] * (np.log(pa[v]) - np.log(pb[v])) for v in range(len(pa)))
      kl_ba = sum(pb[v] * (np.log(pb[v]) - np.log(pa[v])) for v in range(len(pa)))
      total += w[i, j] * (kl_ab + kl_ba) / 2
  return total / w.sum()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 6.0), v=st.integers(2, 9),
       weighted=st.booleans())
def test_symmetric_kl_matches_reference_and_is_symmetric(seed, scale, v, weighted):
  rng = np.random.default_rng(seed)
  a = rng.normal(0.0, scale, (2, 3, v)).astype(np.float32)
  b = rng.normal(0.0, scale, (2, 3, v)).astype(np.float32)
  w = rng.uniform(0.1, 1.0, (2, 3)).astype(np.float32) if weighted else None
  jw = None if w is None else jnp.asarray(w)
  got = float(symmetric_kl(jnp.asarray(a), jnp.asarray(b), jw))
  np.testing.assert_allclose(got, _sym_kl_reference(a, b, w), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(symmetric_kl(jnp.asarray(b), jnp.asarray(a), jw)), got,
                             rtol=1e-6, atol=1e-7)
  assert got >= -1e-6
  assert float(symmetric_kl(jnp.asarray(a), jnp.asarray(a), jw)) == 0.0


# --------------------------------------------------------------------------- the train step


def _cfg(**train):
  """A 1-layer THOR LM: d=16, E=4, k=1 (the paper's), 8-token sequences, batch 4."""
  c = tiny_config(router="thor", top_k=1, expert_hidden=16)
  c.model.d_model, c.model.num_layers, c.model.ffn_hidden = 16, 1, 32
  c.train.batch_size, c.train.seq_len, c.train.warmup_steps = 4, 8, 0
  c.moe.thor.consistency_weight = 0.7
  for k, v in train.items():
    c.train[k] = v
  return c


def _batch(cfg):
  ids = np.random.default_rng(3).integers(0, 258, (cfg.train.batch_size,
                                                  cfg.train.seq_len + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}


def _manual_loss(cfg, variables, batch, rng, t_logits=None):
  """(total loss, mean CE, symmetric KL, kd) of one micro-batch, pass by pass."""
  passes = []
  for r in jax.random.split(rng):
    logits, aux = lm.apply(variables, batch["inputs"], cfg, rng=r)
    ce = trainer.cross_entropy(logits, batch["targets"])
    kd = None if t_logits is None else distill.kd_loss(logits, t_logits,
                                                       cfg.train.distill.temperature)
    lm_loss = ce if kd is None else distill.combined_loss(ce, kd, cfg.train.distill.alpha)
    passes.append((logits, lm_loss, ce, aux, kd))
  (la, lma, cea, auxa, kda), (lb, lmb, ceb, auxb, kdb) = passes
  sym = symmetric_kl(la, lb)
  losses = {k: (auxa["losses"][k] + auxb["losses"][k]) / 2 for k in auxa["losses"]}
  aux = aux_total(losses, declared_aux_losses(cfg), cfg)
  w = cfg.moe.thor.consistency_weight
  kd = None if kda is None else (kda + kdb) / 2
  return (lma + lmb) / 2 + w * sym + aux, (cea + ceb) / 2, sym, kd


def _step(cfg, teacher=None):
  tx = make_optimizer(cfg.train)
  state = trainer.init_state(cfg, tx)
  variables = jax.tree.map(np.array, {"params": state["params"], **state["collections"]})
  _, out = trainer.make_train_step(cfg, tx, None, teacher)(state, _batch(cfg))
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)  # the step's rng at step 0
  return variables, jax.device_get(out["scalars"]), rng


@pytest.mark.parametrize("accum", [1, 2])
def test_step_is_two_passes_with_independent_rngs(accum):
  cfg = _cfg(grad_accum_steps=accum)
  variables, sc, rng = _step(cfg)
  batch = _batch(cfg)
  micro = [jax.tree.map(lambda a, i=i: a.reshape(accum, -1, *a.shape[1:])[i], batch)
           for i in range(accum)]
  rngs = [rng] if accum == 1 else list(jax.random.split(rng, accum))
  got = [_manual_loss(cfg, variables, mb, r) for mb, r in zip(micro, rngs)]
  np.testing.assert_allclose(sc["train/total_loss"], np.mean([g[0] for g in got]), rtol=1e-5)
  np.testing.assert_allclose(sc["train/loss"], np.mean([g[1] for g in got]), rtol=1e-5)
  np.testing.assert_allclose(sc["train/consistency_loss"], np.mean([g[2] for g in got]),
                             rtol=1e-4)
  assert sc["train/consistency_loss"] > 1e-6  # the two passes routed differently
  assert np.isfinite(sc["train/grad_norm"]) and sc["train/grad_norm"] > 0


def test_step_with_distillation_uses_both_passes():
  cfg = _cfg()
  cfg.train.distill.teacher = "teacher-run"  # make_train_step takes the loaded Teacher
  cfg.train.distill.alpha, cfg.train.distill.temperature = 0.4, 2.0
  tcfg = tiny_config(num_experts=2, top_k=1)
  tcfg.model.d_model, tcfg.model.num_layers = 16, 1
  tcfg.moe.topk.renormalize = False
  teacher = distill.Teacher("teacher-run", 0, tcfg, lm.init(jax.random.key(7), tcfg))
  variables, sc, rng = _step(cfg, teacher)
  batch = _batch(cfg)
  t_logits, _ = lm.apply(teacher.variables, batch["inputs"], tcfg)
  total, ce, sym, kd = _manual_loss(cfg, variables, batch, rng, t_logits)
  np.testing.assert_allclose(sc["train/total_loss"], total, rtol=1e-5)
  np.testing.assert_allclose(sc["train/loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(sc["train/kd_loss"], kd, rtol=1e-4)
  np.testing.assert_allclose(sc["train/consistency_loss"], sym, rtol=1e-4)


def test_real_trainer_runs_two_passes(tmp_path):
  cfg = _cfg(steps=3, log_every=1, eval_every=3, checkpoint_every=3, eval_batches=1)
  summary = trainer.train(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for r in train_rows:
    assert np.isfinite(r["train/consistency_loss"]) and r["train/consistency_loss"] > 0
    assert r["train/total_loss"] > r["train/loss"]
  assert np.isfinite(summary["final_val_loss"])
  counts = lm.param_counts(cfg)
  assert summary["params_active"] == counts["params_active"]
  assert summary["params_active_inference"] == counts["params_active_inference"]
  assert summary["flops_per_token"] == lm.flops_per_token(cfg)
  assert os.path.isdir(tmp_path / "checkpoints" / "3")


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize("inference", ["average", "single"])
def test_counts_match_the_parameter_tree(inference):
  cfg = tiny_config(router="thor")
  cfg.moe.thor.inference = inference
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  c = lm.param_counts(cfg)
  assert c["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  expert = 3 * 32 * cfg.moe.expert_hidden
  n_moe = layer_plan(cfg)[1]
  assert c["params_active"] == c["params_total"] - n_moe * (E - K) * expert  # top_k in training
  at_inference = E if inference == "average" else 1
  assert c["params_active_inference"] == c["params_total"] - n_moe * (E - at_inference) * expert
  assert training_passes(cfg) == 2
  m = cfg.model
  one_pass = (6 * (c["params_active"] - c["params_embedding"] + m.vocab_size * m.d_model)
              + 6 * m.num_layers * cfg.train.seq_len * m.d_model)
  assert lm.flops_per_token(cfg) == 2 * one_pass
  plain = tiny_config()
  assert training_passes(plain) == 1
  assert lm.param_counts(plain)["params_active_inference"] == lm.param_counts(plain)[
      "params_active"]


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("key,value,words", [
    ("moe.thor.inference", "sample", ["moe.thor.inference", "'sample'", "average", "single"]),
    ("moe.thor.consistency_weight", -1.0, ["moe.thor.consistency_weight", "-1.0",
                                           "non-negative"]),
    ("moe.thor.seed", -3, ["moe.thor.seed", "-3", "non-negative integer"]),
    ("moe.router_entropy.kind", "shannon", ["moe.router_entropy.kind", "'thor'", "none"]),
    ("moe.erc.weight", 0.1, ["moe.erc.weight", "0.1", "'thor'", "per-expert embeddings"]),
])
def test_bad_values_are_rejected(key, value, words):
  cfg = tiny_config(router="thor")
  validate(cfg)
  node = cfg
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_single_inference_needs_token_ids():
  router = ThorRouter(_moe_cfg("single"))
  x = jnp.zeros((T, D), jnp.float32)
  with pytest.raises(ValueError, match="token id"):
    router.apply({}, x, shape_BxL=(2, 3))
