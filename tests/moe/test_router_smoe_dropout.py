"""SMoE-Dropout: routing against a per-token reference, the frozen router through real
optimizer steps, the k ramp in training, self-slimmable evaluation (tools/evaluate.py
--k), counting and the config checks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import layout
from moejax import model as lm
from moejax.checks import ConfigError
from moejax.moe.routers.smoe_dropout import FROZEN, active_k, smoe_dropout_route
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from moejax.validation import validate
from tests.conftest import assert_exits_2, load_tool, tiny_config


def _reference(logits_TxE: np.ndarray, k: int, k_max: int):
  """Per token: the k_max largest logits (first on ties), the first k live, weights the
  softmax of the live logits."""
  t = logits_TxE.shape[0]
  e_TxK, w_TxK = np.zeros((t, k_max), np.int64), np.zeros((t, k_max))
  for i, row in enumerate(np.asarray(logits_TxE, np.float64)):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k_max]
    live = np.asarray([row[j] for j in order[:k]])
    e_TxK[i] = order
    w_TxK[i, :k] = np.exp(live - live.max()) / np.exp(live - live.max()).sum()
  return e_TxK, w_TxK


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 7), e=st.integers(1, 8), data=st.data())
def test_route_matches_reference(seed, t, e, data):
  k_max = data.draw(st.integers(1, e))
  k = data.draw(st.integers(1, k_max))
  logits = np.random.default_rng(seed).standard_normal((t, e)).astype(np.float32)
  a, probs = smoe_dropout_route(jnp.asarray(logits), k, k_max)
  want_e, want_w = _reference(logits, k, k_max)
  c_A = np.repeat(np.arange(k_max), t)  # choice-major slots
  t_A = np.tile(np.arange(t), k_max)
  np.testing.assert_array_equal(np.asarray(a.token), t_A)
  np.testing.assert_array_equal(np.asarray(a.expert), want_e[t_A, c_A])
  np.testing.assert_array_equal(np.asarray(a.valid), c_A < k)
  np.testing.assert_allclose(np.asarray(a.weight), want_w[t_A, c_A], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_active_k_rounds_and_clips():
  got = [int(active_k(jnp.float32(v), 4)) for v in (0.2, 1.0, 1.49, 1.5, 2.6, 3.99, 7.0)]
  assert got == [1, 1, 1, 2, 3, 4, 4]


def _cfg(**opts):
  cfg = tiny_config(router="smoe_dropout", top_k=4)
  cfg.moe.smoe_dropout.update(k_start=1, k_end=4, ramp_begin=0, ramp_stop=4, **opts)
  cfg.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, eval_batches=1,
                   warmup_steps=2)
  return cfg


def test_the_router_never_trains():
  cfg = _cfg()
  tx = make_optimizer(cfg.train)
  state = trainer.init_state(cfg, tx)
  before = jax.tree.map(np.asarray, state["params"])
  step = trainer.make_train_step(cfg, tx)
  ids = jax.random.randint(jax.random.key(0), (8, 17), 0, 256)
  for _ in range(3):
    state, out = step(state, {"inputs": ids[:, :-1], "targets": ids[:, 1:]})
  after = jax.tree.map(np.asarray, state["params"])
  moe = lambda p: layout.get(p, layout.MOE_PATH)  # noqa: E731
  np.testing.assert_array_equal(moe(after)["router"][FROZEN], moe(before)["router"][FROZEN])
  assert not np.array_equal(moe(after)["experts"]["w_up"], moe(before)["experts"]["w_up"])
  assert float(out["scalars"]["schedule/moe.smoe_dropout.k"]) == 2.5  # 1 + 3 * 2 / 4 at n = 2


def test_self_slimmable_evaluation(tmp_path, capsys):
  cfg = _cfg()
  run = tmp_path / "run"
  trainer.train(cfg, str(run))
  data = tmp_path / "eval.jsonl"
  data.write_text("".join(json.dumps({"text": f"In the beginning {i} was the word."}) + "\n"
                          for i in range(4)))
  evaluate = load_tool("evaluate")
  out = tmp_path / "out.json"
  assert evaluate.main(["--run", str(run), "--data", str(data), "--k", "1,2,4",
                        "--json", str(out)]) == 0
  res = json.loads(out.read_text())
  assert [r["k"] for r in res["by_k"]] == [1, 2, 4]
  by_k = {r["k"]: r["mean_nll"] for r in res["by_k"]}
  assert by_k[4] == pytest.approx(res["mean_nll"], rel=1e-6)  # eval_k = 0: k_end
  assert len(set(by_k.values())) == 3  # each k routes differently
  # The numbers are the model's at that k: lm.apply with eval_k set.
  from moejax.init.sources import load_run  # noqa: PLC0415
  params, collections, _ = load_run(str(run), -1)
  c1 = cfg.copy_and_resolve_references()
  c1.moe.smoe_dropout.eval_k = 1
  logits, aux = lm.apply({"params": params, **collections}, jnp.ones((1, 8), jnp.int32), c1)
  assert np.allclose(np.asarray(aux["metrics"]["experts_per_token"]), 1.0)
  assert_exits_2(evaluate.main, [
      (["--run", str(run), "--data", str(data), "--k", "0"], "--k '0'.*positive integers"),
      (["--run", str(run), "--data", str(data), "--k", "5"],
       "--k 5.*moe.smoe_dropout.eval_k=5.*k_end=4")], capsys)


def test_counts():
  cfg = _cfg(eval_k=1)
  counts = lm.param_counts(cfg)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  assert counts["params_total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
  expert = 3 * cfg.model.d_model * cfg.moe.expert_hidden
  layers = cfg.model.num_layers
  assert counts["params_active"] - counts["params_active_inference"] == 3 * expert * layers


@pytest.mark.parametrize("opts,key,words", [
    ({"k_end": 5}, "moe.smoe_dropout.k_end", "moe.num_experts=4"),
    ({"k_start": 3, "k_end": 2}, "moe.smoe_dropout.k_start", "<= moe.smoe_dropout.k_end"),
    ({"ramp_begin": 10, "ramp_stop": 5}, "moe.smoe_dropout.ramp_stop", "end before it starts"),
    ({"eval_k": 5}, "moe.smoe_dropout.eval_k", "at most"),
    ({"ramp_shape": "exponential"}, "moe.smoe_dropout.ramp_shape", "allowed"),
    ({"k_start": 0}, "moe.smoe_dropout.k_start", "positive integer"),
])
def test_bad_values_are_rejected(opts, key, words):
  cfg = _cfg()
  cfg.moe.smoe_dropout.update(opts)
  with pytest.raises(ConfigError, match=rf"{key}=.*{words}"):
    validate(cfg)


def test_k_end_is_the_slot_buffer():
  cfg = _cfg()
  cfg.moe.top_k = 2
  with pytest.raises(ConfigError, match=r"moe.smoe_dropout.k_end=4.*must equal moe.top_k=2"):
    validate(cfg)
