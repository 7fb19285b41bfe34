"""Null-experts router (AdaMoE): hand case, balance counts, NumPy reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe import losses as moe_losses
from moejax.moe.routers.null_experts import NullExpertsRouter, null_experts_route
from tests.conftest import tiny_config

from . import reference as ref

# E = 2 real experts (0, 1) + 2 null experts (2, 3); logits = log(probs).
PROBS = np.array([[0.40, 0.30, 0.20, 0.10],    # picks 0, 1: both real
                  [0.10, 0.20, 0.50, 0.20],    # picks null 2, then 1 (tie with 3)
                  [0.05, 0.05, 0.60, 0.30]])   # picks nulls 2, 3


def _route(probs, k=2, e=2, renormalize=True):
  return null_experts_route(jnp.asarray(np.log(probs), jnp.float32), k, e, renormalize)


def test_by_hand():
  a, probs, counts, null_fraction = _route(PROBS)
  # Choice-major slots: first choices of tokens 0..2, then second choices.
  np.testing.assert_array_equal(a.token, [0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(a.expert, [0, 1, 1, 1, 1, 1])  # nulls clipped to E-1
  np.testing.assert_array_equal(a.valid, [True, False, False, True, True, False])
  # Renormalised over the k picks including nulls: token 0 .4/.7, .3/.7;
  # token 1's real pick .2/.7 (its null pick's .5/.7 multiplies zero).
  np.testing.assert_allclose(a.weight, [0.4 / 0.7, 0, 0, 0.3 / 0.7, 0.2 / 0.7, 0],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(probs, PROBS, rtol=1e-5)
  np.testing.assert_array_equal(counts, [1, 2, 2, 1])  # null picks counted
  np.testing.assert_allclose(null_fraction, 3 / 6, rtol=1e-6)
  # Switch balance over E + num_null: 4 * sum_i f_i P_i with f = counts / 6
  # and P = column means of PROBS = [.55, .55, 1.3, .6] / 3.
  want = 4 * (1 * 0.55 + 2 * 0.55 + 2 * 1.3 + 1 * 0.6) / 3 / 6
  np.testing.assert_allclose(moe_losses.switch_load_balance(probs, counts), want,
                             rtol=1e-5)
  # Raw probabilities without renormalisation.
  a_raw, *_ = _route(PROBS, renormalize=False)
  np.testing.assert_allclose(a_raw.weight, [0.4, 0, 0, 0.3, 0.2, 0], rtol=1e-5,
                             atol=1e-7)


def _cfg(e=2, k=2, num_null=2):
  c = default_config().moe
  c.router, c.num_experts, c.top_k = "null_experts", e, k
  c.null_experts.num_null = num_null
  return ml_collections.FrozenConfigDict(c)


def test_module_params_and_outputs():
  t, d = 5, 3
  x = jnp.asarray(np.random.default_rng(0).standard_normal((t, d)), jnp.float32)
  cfg = _cfg(e=3, k=2, num_null=2)
  mod = NullExpertsRouter(cfg)
  params = mod.init(jax.random.key(0), x, shape_BxL=(1, t))
  assert params["params"]["w_gate"].shape == (d, 5)
  assert NullExpertsRouter.param_count(cfg, d) == d * 5
  out = mod.apply(params, x, shape_BxL=(1, t))
  assert out.probs_TxE.shape == (t, 5) and out.logits_TxE.shape == (t, 5)
  assert out.balance_counts_E.shape == (5,)
  np.testing.assert_allclose(np.sum(out.balance_counts_E), t * 2)
  assert set(out.metrics) == {"null_fraction"}


@functools.lru_cache(maxsize=None)
def _jit(k, e, renormalize):
  return jax.jit(lambda lg: null_experts_route(lg, k, e, renormalize))


@settings(derandomize=True, deadline=None, max_examples=20)
@given(shape=st.sampled_from([(6, 4, 2, 2), (5, 2, 3, 1), (4, 3, 1, 3)]),
       renormalize=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference(shape, renormalize, seed):
  t, e, n_null, k = shape
  logits = (1.5 * np.random.default_rng(seed).standard_normal((t, e + n_null))
            ).astype(np.float32)
  a, _, counts, null_fraction = _jit(k, e, renormalize)(jnp.asarray(logits))
  tok, exp, wt, probs = ref.topk_route(logits, k, "softmax_topk", renormalize)
  real = exp < e
  np.testing.assert_array_equal(a.token, tok)
  np.testing.assert_array_equal(a.valid, real)
  np.testing.assert_array_equal(a.expert, np.minimum(exp, e - 1))
  np.testing.assert_allclose(a.weight, np.where(real, wt, 0.0), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(counts, np.bincount(exp, minlength=e + n_null))
  np.testing.assert_allclose(null_fraction, 1 - real.mean(), atol=1e-6)


def test_config_validation():
  cfg = tiny_config(router="null_experts")
  cfg.moe.null_experts.num_null = 0
  with pytest.raises(ConfigError, match="moe.null_experts.num_null.*positive"):
    validate(cfg)
