"""Dynamic expert skipping: a per-token loop reference, properties, and the layer metric."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe import MoELayer
from moejax.moe.skipping import skip_low_weight
from moejax.moe.types import Assignment

from . import reference as ref


def _reference(token, weight, valid, num_tokens, threshold):
  """Per token: keep its heaviest valid slot; drop the other valid slots below threshold."""
  keep = valid.copy()
  for t in range(num_tokens):
    slots = [a for a in range(len(token)) if token[a] == t and valid[a]]
    if not slots:
      continue
    top = max(weight[a] for a in slots)
    for a in slots:
      if weight[a] < threshold and weight[a] < top:
        keep[a] = False
  skipped = int(valid.sum() - keep.sum())
  return keep, skipped / max(int(valid.sum()), 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_matches_the_per_token_reference(num_tokens, k, threshold, seed):
  rng = np.random.default_rng(seed)
  token = np.repeat(np.arange(num_tokens), k)[rng.permutation(num_tokens * k)].astype(np.int32)
  weight = rng.dirichlet(np.ones(k), num_tokens).reshape(-1).astype(np.float32)
  weight = np.where(rng.random(weight.size) < 0.2, weight[0], weight)  # some ties
  valid = rng.random(token.size) < 0.8
  a = Assignment(token=jnp.asarray(token), expert=jnp.zeros_like(jnp.asarray(token)),
                 weight=jnp.asarray(weight), valid=jnp.asarray(valid))
  got, fraction = skip_low_weight(a, num_tokens, threshold)
  keep, want_fraction = _reference(token, weight, valid, num_tokens, threshold)
  np.testing.assert_array_equal(np.asarray(got.valid), keep)
  np.testing.assert_allclose(float(fraction), want_fraction, rtol=1e-6)
  # Every token with a valid slot keeps one, and only valid slots are ever kept.
  for t in range(num_tokens):
    if valid[token == t].any():
      assert keep[token == t].any()
  assert not (np.asarray(got.valid) & ~valid).any()


def test_zero_threshold_skips_nothing_and_one_keeps_only_the_top():
  a = Assignment(token=jnp.array([0, 0, 1, 1], jnp.int32), expert=jnp.array([0, 1, 2, 3]),
                 weight=jnp.array([0.7, 0.3, 0.5, 0.5]), valid=jnp.array([True] * 4))
  got, f = skip_low_weight(a, 2, 0.0)
  assert np.asarray(got.valid).all() and float(f) == 0.0
  got, f = jax.jit(skip_low_weight, static_argnums=(1,))(a, 2, 1.0)
  np.testing.assert_array_equal(np.asarray(got.valid), [True, False, True, True])  # a tie stays
  assert float(f) == 0.25


@pytest.mark.parametrize("dispatch", ["dense", "dropless", "capacity"])
def test_the_layer_skips_and_reports_the_fraction(dispatch):
  c = default_config().moe
  c.num_experts, c.top_k, c.expert_hidden, c.dispatch = 4, 2, 16, dispatch
  c.capacity_factor, c.skip_threshold = 4.0, 0.3
  cfg = ml_collections.FrozenConfigDict(c)
  x = np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)
  layer = MoELayer(cfg)
  variables = layer.init(jax.random.key(1), jnp.asarray(x))
  y, aux, _ = layer.apply(variables, jnp.asarray(x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x_TxD = x.reshape(-1, 16).astype(np.float64)
  tok, exp, wt, _ = ref.topk_route(x_TxD @ p["router"]["w_gate"], 2, c.topk.order,
                                   c.topk.renormalize)
  keep, fraction = _reference(np.asarray(tok), np.asarray(wt), np.ones(len(tok), bool),
                              x_TxD.shape[0], 0.3)
  assert 0 < fraction < 1  # the case skips some, not all
  y_ref = ref.moe(x_TxD, tok, exp, wt, keep, p["experts"])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux["metrics"]["skipped_fraction"]), fraction, rtol=1e-6)
  np.testing.assert_allclose(float(aux["metrics"]["experts_per_token"]), keep.sum() / 16)
  assert "skipped_fraction" not in MoELayer(ml_collections.FrozenConfigDict(
      {**c.to_dict(), "skip_threshold": 0.0})).apply(variables, jnp.asarray(x))[1]["metrics"]


@pytest.mark.parametrize("router,tau,message", [
    ("topk", 1.0, r"moe.skip_threshold=1.0 .*\[0, 1\)"),
    ("topk", -0.1, r"moe.skip_threshold=-0.1"),
    ("expert_choice", 0.2, "token-choice top-k router"),
    ("soft", 0.2, "token-choice top-k router"),
])
def test_bad_thresholds_name_the_key(router, tau, message):
  cfg = default_config()
  cfg.moe.router, cfg.moe.skip_threshold = router, tau
  with pytest.raises(ConfigError, match=message):
    validate(cfg)

