"""Group-limited router: hand cases for both modes, NumPy reference, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.checks import ConfigError
from moejax.validation import validate
from moejax.moe.routers.group_limited import group_limited_route
from tests.conftest import tiny_config

from . import reference as ref

# E = 4 in 2 groups {0, 1}, {2, 3}; logits = log(probs) so softmax = probs.
PROBS = np.array([[0.35, 0.10, 0.30, 0.25],
                  [0.50, 0.05, 0.30, 0.15]])


def _route(probs, k, g, mode, top_groups=1, renormalize=True):
  a, p = group_limited_route(jnp.asarray(np.log(probs), jnp.float32), k, g, mode,
                             top_groups, renormalize)
  return (np.asarray(a.token), np.asarray(a.expert), np.asarray(a.weight),
          np.asarray(a.valid), np.asarray(p))


def test_limited_by_hand():
  # Token 0: group scores (top-2 sums) .45 vs .55 -> group 1 -> experts 2
  # (.30), 3 (.25), although plain top-2 would take expert 0 (.35).
  # Token 1: .55 vs .45 -> group 0 -> experts 0 (.50), 1 (.05).
  tok, exp, w, valid, p = _route(PROBS, 2, 2, "limited")
  np.testing.assert_array_equal(tok, [0, 1, 0, 1])  # choice-major
  np.testing.assert_array_equal(exp, [2, 0, 3, 1])
  np.testing.assert_allclose(w, [0.30 / 0.55, 0.50 / 0.55, 0.25 / 0.55, 0.05 / 0.55],
                             rtol=1e-5)
  assert valid.all()
  np.testing.assert_allclose(p, PROBS, rtol=1e-5)
  _, _, w_raw, _, _ = _route(PROBS, 2, 2, "limited", renormalize=False)
  np.testing.assert_allclose(w_raw, [0.30, 0.50, 0.25, 0.05], rtol=1e-5)


def test_limited_group_score_is_top2_sum_not_total():
  # Group 0 = [.30 .11 .11] (top-2 .41, total .52); group 1 = [.22 .22 .04]
  # (top-2 .44, total .48): the top-2 score keeps group 1; the tie between
  # experts 3 and 4 goes to 3.
  probs = np.array([[0.30, 0.11, 0.11, 0.22, 0.22, 0.04]])
  _, exp, w, _, _ = _route(probs, 1, 2, "limited")
  np.testing.assert_array_equal(exp, [3])
  np.testing.assert_allclose(w, [1.0], rtol=1e-6)


def test_balanced_by_hand():
  # k / num_groups = 1 expert from each group, ordered by probability.
  # Token 0: group 0 -> 0 (.35), group 1 -> 2 (.30); token 1: 0 (.50), 2 (.30).
  tok, exp, w, valid, _ = _route(PROBS, 2, 2, "balanced")
  np.testing.assert_array_equal(tok, [0, 1, 0, 1])
  np.testing.assert_array_equal(exp, [0, 0, 2, 2])
  np.testing.assert_allclose(w, [0.35 / 0.65, 0.50 / 0.80, 0.30 / 0.65, 0.30 / 0.80],
                             rtol=1e-5)
  assert valid.all()


def _reference(logits, k, g, mode, top_groups, renormalize):
  """Per token: list of (expert, weight) in choice order."""
  out = []
  for row in np.asarray(logits, np.float64):
    p = ref.softmax(row)
    e = len(p)
    size = e // g
    if mode == "limited":
      scores = [sum(sorted(p[j * size:(j + 1) * size])[::-1][:min(2, size)])
                for j in range(g)]
      keep = sorted(range(g), key=lambda j: (-scores[j], j))[:top_groups]
      allowed = [i for i in range(e) if i // size in keep]
      picks = sorted(allowed, key=lambda i: (-p[i], i))[:k]
    else:
      picks = []
      for j in range(g):
        members = range(j * size, (j + 1) * size)
        picks += sorted(members, key=lambda i: (-p[i], i))[:k // g]
      picks = sorted(picks, key=lambda i: (-p[i], i))
    w = np.array([p[i] for i in picks])
    if renormalize:
      w = w / w.sum()
    out.append(list(zip(picks, w)))
  return out


CASES = [  # (T, E, k, num_groups, mode, top_groups, renormalize)
    (6, 8, 2, 4, "limited", 2, True), (4, 6, 3, 3, "limited", 2, False),
    (5, 4, 2, 2, "balanced", 1, False), (6, 8, 4, 4, "balanced", 1, True),
]


@functools.lru_cache(maxsize=None)
def _jit(k, g, mode, top_groups, renormalize):
  return jax.jit(lambda lg: group_limited_route(lg, k, g, mode, top_groups, renormalize))


@settings(derandomize=True, deadline=None, max_examples=24)
@given(case=st.sampled_from(CASES), seed=st.integers(0, 2**16))
def test_matches_reference(case, seed):
  t, e, k, g, mode, top_groups, renormalize = case
  logits = (2.0 * np.random.default_rng(seed).standard_normal((t, e))).astype(np.float32)
  a, _ = _jit(k, g, mode, top_groups, renormalize)(jnp.asarray(logits))
  exp = np.asarray(a.expert).reshape(k, t).T
  w = np.asarray(a.weight).reshape(k, t).T
  np.testing.assert_array_equal(np.asarray(a.token).reshape(k, t).T,
                                np.repeat(np.arange(t)[:, None], k, 1))
  want = _reference(logits, k, g, mode, top_groups, renormalize)
  size = e // g
  for i in range(t):
    np.testing.assert_array_equal(exp[i], [j for j, _ in want[i]])
    np.testing.assert_allclose(w[i], [v for _, v in want[i]], rtol=1e-5)
    assert len(set(exp[i].tolist())) == k
    groups = exp[i] // size
    if mode == "balanced":  # exactly k / num_groups experts in every group
      np.testing.assert_array_equal(np.bincount(groups, minlength=g), k // g)
    else:
      assert len(set(groups.tolist())) <= top_groups


@pytest.mark.parametrize("opts,words", [
    ({"num_groups": 3}, ["moe.group_limited.num_groups", "3", "moe.num_experts=4"]),
    ({"num_groups": 4, "mode": "balanced"},
     ["moe.group_limited.num_groups", "4", "moe.top_k=2"]),
    ({"top_groups": 3}, ["moe.group_limited.top_groups", "3", "num_groups=2"]),
    ({"num_groups": 4, "top_groups": 1}, ["moe.group_limited.top_groups", "moe.top_k=2"]),
    ({"mode": "random"}, ["moe.group_limited.mode", "'random'", "balanced"]),
    ({"num_groups": 0}, ["moe.group_limited.num_groups", "positive"]),
])
def test_config_validation(opts, words):
  cfg = tiny_config(router="group_limited")  # E = 4, k = 2
  for key, value in opts.items():
    cfg.moe.group_limited[key] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  validate(tiny_config(router="group_limited"))
