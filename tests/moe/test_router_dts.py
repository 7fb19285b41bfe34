"""The dense-to-sparse gate: training and inference routing against per-token references,
the anneal from dense to top-k in a real run, counting and the config checks."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.moe.routers.dts import dts_route, inference_route
from moejax.train import trainer
from moejax.validation import validate
from tests.conftest import tiny_config


def _softmax(v: np.ndarray) -> np.ndarray:
  z = np.exp(v - v.max())
  return z / z.sum()


def _reference(z_TxE: np.ndarray, temperature: float, threshold: float, sparse: bool, k: int):
  """Per token: experts by descending gate, live ones and their weights."""
  out = []
  for row in np.asarray(z_TxE, np.float64):
    g = _softmax(row / temperature)
    order = sorted(range(len(g)), key=lambda j: (-g[j], j))
    live = order[:k] if sparse else [j for c, j in enumerate(order) if c == 0 or g[j] >= threshold]
    out.append((order, {j: g[j] for j in live}))
  return out


def _per_token(a, t):
  """[(experts in slot order, {live expert: weight})] from a choice-major assignment."""
  e = np.asarray(a.expert).reshape(-1, t).T
  w = np.asarray(a.weight).reshape(-1, t).T
  v = np.asarray(a.valid).reshape(-1, t).T
  return [(list(e[i]), {int(x): float(y) for x, y, ok in zip(e[i], w[i], v[i]) if ok})
          for i in range(t)]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 6), e=st.integers(1, 8),
       temperature=st.floats(0.1, 5.0), threshold=st.floats(0.0, 0.5), sparse=st.booleans(),
       data=st.data())
def test_training_route_matches_reference(seed, t, e, temperature, threshold, sparse, data):
  k = data.draw(st.integers(1, e))
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((t, e)).astype(np.float32)
  noise = rng.gumbel(size=(t, e)).astype(np.float32)
  a, gate = dts_route(jnp.asarray(logits), jnp.asarray(noise), jnp.float32(temperature),
                      threshold, jnp.float32(float(sparse)), k)
  want = _reference(logits + noise, temperature, threshold, sparse, k)
  got = _per_token(a, t)
  for (order, live), (g_order, g_live) in zip(want, got):
    assert sorted(g_live) == sorted(live)
    np.testing.assert_allclose([g_live[j] for j in sorted(live)],
                               [live[j] for j in sorted(live)], rtol=1e-4, atol=1e-6)
    assert sorted(g_order) == list(range(e))  # every expert has a slot
  np.testing.assert_allclose(np.asarray(gate).sum(-1), 1.0, rtol=1e-5)


def test_a_hot_gate_is_dense_and_a_cold_one_is_top1():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
  hot, _ = dts_route(logits, None, jnp.float32(1e4), 0.01, jnp.float32(0.0), 2)
  assert np.asarray(hot.valid).all()  # every gate weight ~ 1/4 >= 0.01
  np.testing.assert_allclose(np.asarray(hot.weight), 0.25, atol=1e-3)
  cold, _ = dts_route(logits, None, jnp.float32(1e-3), 0.01, jnp.float32(0.0), 2)
  assert int(np.asarray(cold.valid).sum()) == 5  # the best expert only, weight ~ 1
  np.testing.assert_array_equal(np.asarray(cold.expert)[:5], np.argmax(np.asarray(logits), 1))


def test_inference_route_matches_reference():
  logits = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
  got = _per_token(inference_route(jnp.asarray(logits), 0.3, 2), 6)
  for (order, live), (g_order, g_live) in zip(_reference(logits, 0.3, 1.0, True, 2), got):
    assert g_order == order[:2]
    np.testing.assert_allclose([g_live[j] for j in order[:2]], [live[j] for j in order[:2]],
                               rtol=1e-5)


def test_training_anneals_from_dense_to_top_k(tmp_path):
  cfg = tiny_config(router="dts")
  cfg.moe.dts.update(temperature_start=1e3, temperature_end=0.1, anneal_begin=0,
                     anneal_stop=4, threshold=0.05)
  cfg.train.update(steps=6, log_every=1, eval_every=6, checkpoint_every=6, eval_batches=1,
                   warmup_steps=2)
  summary = trainer.train(cfg, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}
  per = {s: [rows[s][f"moe/layer{i}/experts_per_token"] for i in (0, 1)] for s in rows}
  assert per[1] == [4.0, 4.0]  # tau = 1000: every expert is over the threshold
  assert per[5] == per[6] == [2.0, 2.0]  # from anneal_stop on: top-k
  temps = [rows[s]["schedule/moe.dts.temperature"] for s in sorted(rows)]
  assert temps[0] == pytest.approx(1e3) and temps[4] == pytest.approx(0.1)
  assert all(a > b for a, b in zip(temps[:4], temps[1:5]))  # exponential decay
  assert [rows[s]["schedule/moe.dts.sparse"] for s in sorted(rows)] == [0, 0, 0, 0, 1, 1]
  counts = lm.param_counts(cfg)
  assert summary["params_active"] == counts["params_active"]
  expert = 3 * cfg.model.d_model * cfg.moe.expert_hidden
  assert counts["params_active"] - counts["params_active_inference"] == 2 * expert * 2


@pytest.mark.parametrize("opts,key,words", [
    ({"temperature_start": 0.0}, "moe.dts.temperature_start", "positive"),
    ({"threshold": 1.0}, "moe.dts.threshold", r"\[0, 1\)"),
    ({"anneal_begin": 9, "anneal_stop": 3}, "moe.dts.anneal_stop", "end before it starts"),
    ({"anneal_shape": "fast"}, "moe.dts.anneal_shape", "allowed"),
])
def test_bad_values_are_rejected(opts, key, words):
  cfg = tiny_config(router="dts")
  cfg.moe.dts.update(opts)
  with pytest.raises(ConfigError, match=rf"{key}=.*{words}"):
    validate(cfg)


def test_training_mode_without_schedule_values_is_refused():
  cfg = tiny_config(router="dts")
  v = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))
  model = lm.make_model(cfg, deterministic=False)
  with pytest.raises(ValueError, match="moe.dts.temperature.*schedule="):
    jax.eval_shape(lambda v: model.apply(v, jnp.ones((1, 16), jnp.int32),
                                         rngs={"router": jax.random.key(1)}), v)
