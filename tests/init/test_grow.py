"""Growing experts: the grown MoE computes exactly what the source MoE did."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.config import ConfigError, validate
from moejax.init.grow import grow_params
from moejax.init.sources import load_run
from moejax.moe.routers.topk import copy_group_route, topk_route
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config
from tests.init.run_dirs import write_run

IDS = jax.random.randint(jax.random.key(2), (2, 16), 0, 258)


def source_config(order="softmax_topk", renormalize=True, k=2):
  c = tiny_config(dispatch="dense", top_k=k)
  c.moe.topk.order = order
  c.moe.topk.renormalize = renormalize
  return c


def grown_config(src, m):
  c = src.copy_and_resolve_references()
  c.moe.num_experts = src.moe.num_experts * m
  c.moe.topk.copies = src.moe.topk.copies * m
  return c


@pytest.mark.parametrize("order,renormalize,k,m", [
    ("softmax_topk", True, 2, 2), ("softmax_topk", False, 2, 3), ("topk_softmax", True, 3, 2)])
def test_grown_logits_equal_source(order, renormalize, k, m):
  src = source_config(order, renormalize, k)
  variables = lm.init(jax.random.key(1), src)
  want, _ = lm.apply(variables, IDS, src)
  grown = grow_params(variables["params"], m)  # perturbation zero
  cfg = grown_config(src, m)
  got, _ = lm.apply({**variables, "params": grown}, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  if order == "softmax_topk" and renormalize:
    # Sanity: plain top-k over the tied copies (copies=1) changes the output.
    cfg.moe.topk.copies = 1
    naive, _ = lm.apply({**variables, "params": grown}, IDS, cfg)
    assert float(jnp.max(jnp.abs(naive - want))) > 1e-2


@settings(max_examples=10, deadline=None, derandomize=True)
@given(m=st.integers(1, 3), k=st.integers(1, 4),
       order=st.sampled_from(["softmax_topk", "topk_softmax"]), renorm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_copy_group_route_on_tied_copies_matches_topk(m, k, order, renorm, seed):
  """Reference: top-k on the original logits; each pick goes to the group's first copy."""
  t, e = 6, 4  # fixed shapes: one compilation per (m, k)
  logits = np.random.default_rng(seed).normal(size=(t, e)).astype(np.float32)
  ref, _ = topk_route(jnp.asarray(logits), k, order, renorm)
  got, probs = copy_group_route(jnp.asarray(np.repeat(logits, m, axis=1)), k, m, order, renorm)
  np.testing.assert_array_equal(got.token, ref.token)
  np.testing.assert_array_equal(got.expert, np.asarray(ref.expert) * m)
  np.testing.assert_allclose(got.weight, ref.weight, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(probs).reshape(t, e, m).sum(-1),
                             jax.nn.softmax(logits, axis=-1), rtol=1e-5, atol=1e-6)


def test_copy_group_route_picks_the_best_copy():
  logits = jnp.asarray([[0.0, 1.0, 5.0, 4.0]])  # groups (0, 1), (2, 3)
  a, _ = copy_group_route(logits, 1, 2)
  assert a.expert.tolist() == [2]
  a, _ = copy_group_route(logits, 2, 2)
  assert sorted(a.expert.tolist()) == [1, 2]


def test_grow_noise_only_touches_the_router():
  params = lm.init(jax.random.key(1), source_config())["params"]
  g = grow_params(params, 2, noise=0.01, rng=jax.random.key(3))
  moe, src = g["moe_layers"]["block0"]["moe"], params["moe_layers"]["block0"]["moe"]
  np.testing.assert_array_equal(moe["experts"]["w_up"][:, 1], src["experts"]["w_up"][:, 0])
  delta = moe["router"]["w_gate"] - jnp.repeat(src["router"]["w_gate"], 2, axis=-1)
  assert 0.005 < float(jnp.std(delta)) < 0.02
  np.testing.assert_array_equal(g["embed"], params["embed"])


def test_config_option_and_errors(tmp_path):
  src = source_config()
  src.train.batch_size = 4
  src.train.eval_batches = 1
  run = str(tmp_path / "moe")
  saved = write_run(run, src, perturb=0.02)
  cfg = grown_config(src, 2)
  cfg.init.grow_from = run
  validate(cfg)
  state = trainer.init_state(cfg, make_optimizer(cfg.train))
  params, _, _ = load_run(run)
  jax.tree.map(np.testing.assert_array_equal, state["params"], grow_params(params, 2))
  jax.tree.map(np.testing.assert_array_equal, params, saved)
  bad = cfg.copy_and_resolve_references()
  bad.moe.topk.copies = 1
  with pytest.raises(ConfigError, match="moe.topk.copies=1"):
    validate(bad)
  bad = cfg.copy_and_resolve_references()
  bad.moe.num_experts = 12
  bad.moe.topk.copies = 3
  with pytest.raises(ConfigError, match="moe.num_experts=12"):
    validate(bad)
  bad = cfg.copy_and_resolve_references()
  bad.init.grow_factor = 1
  with pytest.raises(ConfigError, match="init.grow_factor=1"):
    validate(bad)
