"""Auxiliary routing losses against hand-computed numbers and NumPy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from moejax.moe.losses import router_z_loss, switch_load_balance
from moejax.moe.routers.topk import topk_route

from . import reference as ref

_balance = jax.jit(switch_load_balance)
_z_loss = jax.jit(router_z_loss)

LN3 = math.log(3.0)
# 4 tokens, 2 experts. Router probabilities (softmax of the logits):
#   token 0: logits [0, 0]      -> p = [1/2, 1/2]
#   token 1: logits [ln 3, 0]   -> p = [3/4, 1/4]
#   token 2: logits [0, ln 3]   -> p = [1/4, 3/4]
#   token 3: logits [ln 3, 0]   -> p = [3/4, 1/4]
LOGITS = np.array([[0.0, 0.0], [LN3, 0.0], [0.0, LN3], [LN3, 0.0]], np.float32)


def test_hand_computed_4_tokens_2_experts():
  # Top-1 choices: token 0 ties -> expert 0 (lower index); 1 -> 0; 2 -> 1;
  # 3 -> 0. Counts = [3, 1], so f = [3/4, 1/4].
  # Mean probabilities P = [(1/2 + 3/4 + 1/4 + 3/4) / 4, (1/2 + 1/4 + 3/4 + 1/4) / 4]
  #                      = [9/16, 7/16].
  # Balance loss = E * sum f_i P_i = 2 * (3/4 * 9/16 + 1/4 * 7/16)
  #              = 2 * (27/64 + 7/64) = 2 * 34/64 = 17/16 = 1.0625.
  a, probs = topk_route(jnp.asarray(LOGITS), 1)
  np.testing.assert_array_equal(np.asarray(a.expert), [0, 0, 1, 0])
  counts = a.expert_counts(2)
  np.testing.assert_array_equal(np.asarray(counts), [3.0, 1.0])
  np.testing.assert_allclose(np.asarray(probs),
                             [[.5, .5], [.75, .25], [.25, .75], [.75, .25]],
                             rtol=1e-6)
  lb = switch_load_balance(probs, counts)
  assert lb.shape == () and lb.dtype == jnp.float32
  np.testing.assert_allclose(float(lb), 17.0 / 16.0, rtol=1e-6)
  # z-loss: logsumexp per token = [ln 2, ln 4, ln 4, ln 4] = ln2 * [1, 2, 2, 2];
  # mean of squares = ln2^2 * (1 + 4 + 4 + 4) / 4 = 13/4 * ln2^2 = 1.5614723...
  z = router_z_loss(jnp.asarray(LOGITS))
  assert z.shape == () and z.dtype == jnp.float32
  np.testing.assert_allclose(float(z), 13.0 / 4.0 * math.log(2.0) ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(13.0 / 4.0 * math.log(2.0) ** 2, 1.5614723,
                             rtol=1e-7)


def test_hand_computed_top2_counts():
  # With k = 2 every token uses both experts: counts [4, 4], f = [1/2, 1/2],
  # loss = 2 * (1/2 * 9/16 + 1/2 * 7/16) = 1 whatever the probabilities.
  a, probs = topk_route(jnp.asarray(LOGITS), 2)
  counts = a.expert_counts(2)
  np.testing.assert_array_equal(np.asarray(counts), [4.0, 4.0])
  np.testing.assert_allclose(float(_balance(probs, counts)), 1.0,
                             rtol=1e-6)


def test_balance_is_one_at_uniform_routing():
  for t, e in ((4, 2), (12, 4), (7, 7), (3, 1)):
    probs = jnp.full((t, e), 1.0 / e)
    counts = jnp.full((e,), 3.0)
    np.testing.assert_allclose(float(_balance(probs, counts)), 1.0,
                               rtol=1e-6)
    # Uniform counts give 1 for any probabilities (sum_i P_i = 1).
    p = np.random.default_rng(t).dirichlet(np.ones(e), size=t)
    p = jnp.asarray(p, jnp.float32)
    np.testing.assert_allclose(float(_balance(p, counts)), 1.0,
                               rtol=1e-5)


def test_balance_extremes():
  # Everything to expert 0 with router probability 1: loss = E * 1 * 1 = E.
  e = 4
  probs = jnp.zeros((5, e)).at[:, 0].set(1.0)
  counts = jnp.array([5.0, 0, 0, 0])
  np.testing.assert_allclose(float(_balance(probs, counts)), e)
  # No valid assignment at all: f = 0, loss = 0 (no division by zero).
  assert float(_balance(probs, jnp.zeros((e,)))) == 0.0


def test_z_loss_is_large_logit_safe_and_bf16_upcast():
  logits = jnp.array([[100.0, 100.0], [-100.0, 0.0]])
  # lse = [100 + ln 2, ln(1 + e^-100) ~ 0]
  np.testing.assert_allclose(float(router_z_loss(logits)),
                             ((100 + math.log(2)) ** 2) / 2, rtol=1e-6)
  lb = jnp.asarray(LOGITS, jnp.bfloat16)
  rounded = np.asarray(lb.astype(jnp.float32))
  z = router_z_loss(lb)
  assert z.dtype == jnp.float32
  np.testing.assert_allclose(float(z), ref.router_z_loss(rounded), rtol=1e-6)


@settings(derandomize=True, deadline=None, max_examples=25)
@given(t=st.integers(1, 24), e=st.integers(1, 8), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.01, 1.0, 30.0]),
       skew=st.sampled_from(["random", "one", "empty"]))
def test_losses_hypothesis(t, e, seed, scale, skew):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((t, e))).astype(np.float32)
  probs = np.stack([ref.softmax(r) for r in logits]).astype(np.float32)
  if skew == "random":
    counts = rng.integers(0, 5, size=e).astype(np.float32)
  elif skew == "one":
    counts = np.zeros(e, np.float32)
    counts[rng.integers(e)] = t
  else:
    counts = np.zeros(e, np.float32)
  lb = _balance(jnp.asarray(probs), jnp.asarray(counts))
  np.testing.assert_allclose(float(lb), ref.switch_load_balance(probs, counts),
                             rtol=1e-5, atol=1e-6)
  z = _z_loss(jnp.asarray(logits))
  np.testing.assert_allclose(float(z), ref.router_z_loss(logits), rtol=1e-5,
                             atol=1e-6)
