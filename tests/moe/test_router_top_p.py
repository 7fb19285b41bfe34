"""Top-p (dynamic) router: hand case, overflow, entropy loss, NumPy reference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe.routers.top_p import TopPRouter, mean_entropy, top_p_route
from tests.conftest import tiny_config

from . import reference as ref

# p = 0.7, max_k = 2, E = 4; logits = log(probs).
PROBS = np.array([[0.60, 0.20, 0.10, 0.10],    # .6 < .7, .8 >= .7: experts 0, 1
                  [0.75, 0.10, 0.10, 0.05],    # .75 >= .7: expert 0 only
                  [0.40, 0.10, 0.25, 0.25],    # 0, 2 (tie -> 2): .65 < .7, cut
                  [0.25, 0.25, 0.25, 0.25]])   # 0, 1: .5 < .7, cut


def _route(probs, p=0.7, max_k=2, renormalize=False):
  return top_p_route(jnp.asarray(np.log(probs), jnp.float32), p, max_k, renormalize)


def test_by_hand():
  a, probs, overflow = _route(PROBS)
  np.testing.assert_array_equal(a.token, [0, 1, 2, 3] * 2)  # choice-major
  np.testing.assert_array_equal(a.expert, [0, 0, 0, 0, 1, 1, 2, 1])
  np.testing.assert_array_equal(a.valid, [True] * 5 + [False, True, True])
  np.testing.assert_allclose(a.weight, [0.6, 0.75, 0.4, 0.25, 0.2, 0.0, 0.25, 0.25],
                             rtol=1e-5)
  np.testing.assert_array_equal(overflow, [False, False, True, True])
  a_n, _, _ = _route(PROBS, renormalize=True)
  np.testing.assert_allclose(
      a_n.weight, [0.75, 1.0, 0.4 / 0.65, 0.5, 0.25, 0.0, 0.25 / 0.65, 0.5], rtol=1e-5)
  # Entropy by hand (nats), mean over the 4 tokens.
  h = lambda ps: -sum(q * math.log(q) for q in ps)  # noqa: E731
  np.testing.assert_allclose(mean_entropy(probs), np.mean([h(r) for r in PROBS]),
                             rtol=1e-5)
  assert abs(h(PROBS[3]) - math.log(4)) < 1e-12


def test_max_k_equal_to_e_never_overflows():
  a, _, overflow = _route(PROBS, p=1.0, max_k=4)
  assert not np.asarray(overflow).any()
  assert np.asarray(a.valid).all()  # p = 1 takes everything


def _cfg(p=0.7, max_k=2, entropy_weight=0.5, e=4):
  c = default_config().moe
  c.router, c.num_experts = "top_p", e
  c.top_p.p, c.top_p.max_k, c.top_p.entropy_weight = p, max_k, entropy_weight
  return ml_collections.FrozenConfigDict(c)


def test_module_losses_and_metrics():
  x = jnp.eye(4, dtype=jnp.float32)  # logits = rows of w_gate
  mod = TopPRouter(_cfg(entropy_weight=0.5))
  params = mod.init(jax.random.key(0), x, shape_BxL=(1, 4))
  params = {"params": {"w_gate": jnp.asarray(np.log(PROBS), jnp.float32)}}
  out = mod.apply(params, x, shape_BxL=(1, 4))
  h = lambda ps: -sum(q * math.log(q) for q in ps)  # noqa: E731
  # Reported unweighted; moe.top_p.entropy_weight is its declared weight.
  np.testing.assert_allclose(out.losses["entropy_loss"],
                             np.mean([h(r) for r in PROBS]), rtol=1e-5)
  np.testing.assert_allclose(out.metrics["overflow_fraction"], 0.5)
  assert [(a.name, a.weight) for a in TopPRouter.aux_losses(_cfg())] == [
      ("entropy_loss", "moe.top_p.entropy_weight")]


def _reference(probs_TxE, p, max_k):
  """Per token: (experts in order, overflow) from float64 probabilities."""
  out = []
  for row in np.asarray(probs_TxE, np.float64):
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    picks, mass = [], 0.0
    for i in order:
      if mass >= p:
        break
      picks.append(i)
      mass += row[i]
    out.append((picks[:max_k], len(picks) > max_k))
  return out


@functools.lru_cache(maxsize=None)
def _jit(p, max_k):
  return jax.jit(lambda lg: top_p_route(lg, p, max_k))


@settings(derandomize=True, deadline=None, max_examples=24)
@given(shape=st.sampled_from([(6, 4, 3), (5, 8, 4), (4, 3, 1)]),
       p=st.sampled_from([0.3, 0.55, 0.9]), scale=st.sampled_from([0.3, 1.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_matches_reference(shape, p, scale, seed):
  t, e, max_k = shape
  logits = (scale * np.random.default_rng(seed).standard_normal((t, e))).astype(np.float32)
  a, probs, overflow = _jit(p, max_k)(jnp.asarray(logits))
  probs = np.asarray(probs, np.float64)
  np.testing.assert_allclose(probs, [ref.softmax(r) for r in logits], rtol=1e-5)
  exp = np.asarray(a.expert).reshape(max_k, t).T
  valid = np.asarray(a.valid).reshape(max_k, t).T
  w = np.asarray(a.weight).reshape(max_k, t).T
  for i, (picks, cut) in enumerate(_reference(probs, p, max_k)):
    n = len(picks)
    assert valid[i].tolist() == [True] * n + [False] * (max_k - n)
    np.testing.assert_array_equal(exp[i, :n], picks)
    np.testing.assert_allclose(w[i, :n], probs[i, picks], rtol=1e-5)
    np.testing.assert_array_equal(w[i, n:], 0.0)
    assert bool(overflow[i]) == cut


@pytest.mark.parametrize("key,value,words", [
    ("p", 0.0, ["moe.top_p.p", "(0, 1]"]), ("p", 1.5, ["moe.top_p.p", "1.5"]),
    ("max_k", 5, ["moe.top_p.max_k", "5", "moe.num_experts=4"]),
    ("max_k", 0, ["moe.top_p.max_k", "positive"]),
    ("entropy_weight", -1.0, ["moe.top_p.entropy_weight", "non-negative"]),
])
def test_config_validation(key, value, words):
  cfg = tiny_config(router="top_p")
  cfg.moe.top_p[key] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
