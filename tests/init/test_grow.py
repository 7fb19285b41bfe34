"""Growing experts: the grown MoE computes exactly what the source MoE did."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.validation import validate
from moejax.init import grow
from moejax.init.hooks import initial_variables
from moejax.init.sources import load_run
from moejax.moe.routers.topk import copy_groups, group_route, topk_route
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config
from tests.init.run_dirs import write_run

IDS = jax.random.randint(jax.random.key(2), (2, 16), 0, 258)


def grow_params(params, m, noise=0.0, rng=None):
  """Every expert m times (init.grow_select='all')."""
  e = params["moe_layers"]["block0"]["moe"]["router"]["w_gate"].shape[-1]
  return grow.grow_params(params, grow.all_copies(e, grow.num_periods(params), m), noise, rng)


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
  assert "moe_state" not in variables  # uniform copies need no group state
  cfg = grown_config(src, m)
  got, _ = lm.apply({**variables, "params": grown}, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  if order == "softmax_topk" and renormalize:
    # Sanity: plain top-k over the tied copies (copies=1) changes the output.
    cfg.moe.topk.copies = 1
    naive, _ = lm.apply({**variables, "params": grown}, IDS, cfg)
    assert float(jnp.max(jnp.abs(naive - want))) > 1e-2


def copy_route(logits, k, m, order="softmax_topk", renorm=False):
  t, e = logits.shape
  return group_route(jnp.asarray(logits), k, copy_groups(e, m), e // m, order, renorm)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(m=st.integers(1, 3), k=st.integers(1, 4),
       order=st.sampled_from(["softmax_topk", "topk_softmax"]), renorm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_copy_group_route_on_tied_copies_matches_topk(m, k, order, renorm, seed):
  """Reference: top-k on the original logits; each pick goes to the group's first copy."""
  t, e = 6, 4  # fixed shapes: one compilation per (m, k)
  logits = np.random.default_rng(seed).normal(size=(t, e)).astype(np.float32)
  ref, _ = topk_route(jnp.asarray(logits), k, order, renorm)
  got, probs = copy_route(np.repeat(logits, m, axis=1), k, m, order, renorm)
  np.testing.assert_array_equal(got.token, ref.token)
  np.testing.assert_array_equal(got.expert, np.asarray(ref.expert) * m)
  np.testing.assert_allclose(got.weight, ref.weight, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(probs).reshape(t, e, m).sum(-1),
                             jax.nn.softmax(logits, axis=-1), rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 3), tied=st.booleans(),
       order=st.sampled_from(["softmax_topk", "topk_softmax"]))
def test_group_route_matches_slow_reference(seed, k, tied, order):
  """Uneven groups in any order vs a per-token loop; tied copies vs top-k on the originals."""
  rng = np.random.default_rng(seed)
  g, e = 4, 7  # fixed shapes: one compilation per (k, order)
  group = np.concatenate([np.arange(g), rng.integers(0, g, e - g)])
  rng.shuffle(group)
  orig = rng.normal(size=(5, g)).astype(np.float32)
  logits = orig[:, group] + (0 if tied else rng.normal(size=(5, e)).astype(np.float32))
  got, _ = group_route(jnp.asarray(logits), k, jnp.asarray(group), g, order, True)
  got_e = np.asarray(got.expert).reshape(k, 5).T
  got_w = np.asarray(got.weight).reshape(k, 5).T
  for t in range(5):
    lme = np.array([np.log(np.mean(np.exp(logits[t, group == j].astype(np.float64))))
                    for j in range(g)])
    top = np.argsort(-lme, kind="stable")[:k]
    if order == "softmax_topk":
      p = np.exp(lme - lme.max()) / np.exp(lme - lme.max()).sum()
      w = p[top] / p[top].sum()
    else:
      w = np.exp(lme[top] - lme[top].max()) / np.exp(lme[top] - lme[top].max()).sum()
    best = [int(np.flatnonzero(group == j)[np.argmax(logits[t, group == j])]) for j in top]
    assert got_e[t].tolist() == best
    np.testing.assert_allclose(got_w[t], w, rtol=1e-5, atol=1e-6)
    if tied:  # the first member of each picked group is as good as any: same logits
      ref, _ = topk_route(jnp.asarray(orig[t:t + 1]), k, order, True)
      assert group[got_e[t]].tolist() == np.asarray(ref.expert).tolist()


def test_copy_group_route_picks_the_best_copy():
  logits = np.asarray([[0.0, 1.0, 5.0, 4.0]])  # groups (0, 1), (2, 3)
  a, _ = copy_route(logits, 1, 2)
  assert a.expert.tolist() == [2]
  a, _ = copy_route(logits, 2, 2)
  assert sorted(a.expert.tolist()) == [1, 2]


def test_dhondt_copies():
  score = np.array([[1.0, 8.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
  src = grow.dhondt_copies(score, 7)
  # row 0: 8/1 -> e1; 8/2=4 -> e1; 3 vs 8/3=2.67 -> e2; row 1: ties -> lowest index.
  assert src.tolist() == [[0, 1, 2, 3, 1, 1, 2], [0, 1, 2, 3, 0, 1, 2]]
  with pytest.raises(ValueError, match="moe.num_experts=4"):
    grow.dhondt_copies(score, 4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), e=st.integers(1, 6), extra=st.integers(1, 10))
def test_dhondt_copies_is_proportional(seed, e, extra):
  """Every original kept; no copy moved between experts would lower the largest share."""
  score = np.random.default_rng(seed).exponential(size=(1, e)) + 1e-3
  src = grow.dhondt_copies(score, e + extra)[0]
  assert src[:e].tolist() == list(range(e)) and len(src) == e + extra
  c = np.bincount(src, minlength=e)
  for a in range(e):
    for b in range(e):
      if c[b] > 1 and a != b:  # D'Hondt: s_a / (c_a + 1) <= s_b / c_b ... up to ties
        assert score[0, a] / (c[a] + 1) <= score[0, b] / (c[b] - 1) + 1e-12


def test_expert_importance_is_the_taylor_estimate():
  """Reference: jvp of the LM loss along each expert's own weights, batch by batch."""
  cfg = source_config()
  variables = lm.init(jax.random.key(1), cfg)
  params = variables["params"]
  ids = jax.random.randint(jax.random.key(5), (2, 3, 17), 0, 258)
  batches = [{"inputs": b[:, :-1], "targets": b[:, 1:]} for b in ids]
  got = grow.expert_importance(cfg, params, {}, batches)
  model = lm.make_model(cfg, deterministic=True)
  experts = params["moe_layers"]["block0"]["moe"]["experts"]

  @jax.jit
  def directional(v, inputs, targets):
    def loss(q):
      logits, _ = model.apply({"params": q}, inputs)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    return jax.jvp(loss, (params,), (v,))[1]

  p_layers, e = got.shape
  for p in range(p_layers):
    for j in range(e):
      def along(x):
        mask = jnp.zeros(x.shape[:2], x.dtype).at[p, j].set(1.0)
        return x * mask.reshape(mask.shape + (1,) * (x.ndim - 2))
      v = jax.tree.map(jnp.zeros_like, params)
      v["moe_layers"]["block0"]["moe"]["experts"] = jax.tree.map(along, experts)
      total = sum(float(directional(v, b["inputs"], b["targets"])) for b in batches)
      np.testing.assert_allclose(got[p, j], abs(total / len(batches)), rtol=2e-3, atol=1e-7)


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
  assert_refused(cfg, {"moe.topk.copies": 1}, "moe.topk.copies=1")
  assert_refused(cfg, {"moe.num_experts": 12, "moe.topk.copies": 3}, "moe.num_experts=12")
  assert_refused(cfg, {"init.grow_factor": 0}, "init.grow_factor=0")
  # The attention's form must match the source's too (MODEL_KEYS).
  assert_refused(cfg, {"model.num_kv_heads": 1}, "model.num_kv_heads=1")
  assert_refused(cfg, {"model.qk_norm": "head"}, "model.qk_norm='head'")


def assert_refused(cfg, changes: dict, match: str) -> None:
  """validate() raises ConfigError matching `match` for cfg with dotted `changes` applied."""
  bad = cfg.copy_and_resolve_references()
  for key, value in changes.items():
    *path, last = key.split(".")
    node = bad
    for part in path:
      node = node[part]
    node[last] = value
  with pytest.raises(ConfigError, match=match):
    validate(bad)


def importance_config(src, e_new):
  c = src.copy_and_resolve_references()
  c.moe.num_experts = e_new
  c.moe.topk.grown_groups = src.moe.num_experts
  c.init.grow_select = "importance"
  c.init.grow_batches = 2
  return c


def test_importance_growth_keeps_logits_and_duplicates_the_important(tmp_path):
  """Source E=4 -> 7 (uneven groups, per layer); then 'all' x2 on top of it -> 14."""
  src = source_config()
  src.train.batch_size = 4
  run = str(tmp_path / "moe")
  write_run(run, src, perturb=0.05)
  params, _, _ = load_run(run)
  want, _ = lm.apply({"params": params}, IDS, src)
  cfg = importance_config(src, 7)
  cfg.init.grow_from = run
  validate(cfg)
  variables = initial_variables(cfg, lm.init(jax.random.key(0), cfg))
  got, _ = lm.apply(variables, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  group = np.asarray(variables["moe_state"]["moe_layers"]["block0"]["moe"]["router"]["group"])
  assert group.shape == (2, 7) and group[:, :4].tolist() == [[0, 1, 2, 3]] * 2
  from moejax.train import data as data_lib  # noqa: PLC0415
  data = data_lib.make_data(cfg.data.path, cfg.train.seq_len, cfg.data.val_fraction, cfg.seed)
  it = data.train_iterator(cfg.train.batch_size, seed=(cfg.seed + 104729) % 2**32)
  score = grow.expert_importance(src, params, {}, [next(it) for _ in range(2)])
  np.testing.assert_array_equal(group, grow.dhondt_copies(score, 7))
  w = variables["params"]["moe_layers"]["block0"]["moe"]["experts"]["w_up"]
  src_w = params["moe_layers"]["block0"]["moe"]["experts"]["w_up"]
  for p in range(2):
    np.testing.assert_array_equal(w[p], src_w[p][group[p]])
  assert set(group[:, 4:].ravel()) <= set(np.argsort(-score, axis=1)[:, :3].ravel())

  # Chained: the importance-grown run grown again, every expert twice (groups carried over).
  run2 = str(tmp_path / "grown")
  write_run(run2, _plain(cfg), perturb=0.05)  # group state = default_groups(7, 4)
  cfg2 = grown_config(_plain(cfg), 2)
  cfg2.moe.topk.copies = 1
  cfg2.init.grow_from = run2
  validate(cfg2)
  v2 = initial_variables(cfg2, lm.init(jax.random.key(0), cfg2))
  p1, c1, _ = load_run(run2)
  want2, _ = lm.apply({"params": p1, **c1}, IDS, _plain(cfg))
  got2, _ = lm.apply(v2, IDS, cfg2)
  np.testing.assert_allclose(got2, want2, atol=2e-5, rtol=2e-5)
  g2 = np.asarray(v2["moe_state"]["moe_layers"]["block0"]["moe"]["router"]["group"])
  g1 = np.asarray(c1["moe_state"]["moe_layers"]["block0"]["moe"]["router"]["group"])
  np.testing.assert_array_equal(g2, np.repeat(g1, 2, axis=1))

  assert_refused(cfg, {"moe.topk.grown_groups": 0}, "moe.topk.grown_groups=0")
  assert_refused(cfg, {"moe.num_experts": 4}, "moe.num_experts=4")
  assert_refused(cfg, {"init.grow_select": "gradient"}, "init.grow_select='gradient'")
  assert_refused(cfg, {"init.grow_batches": 0}, "init.grow_batches=0")
  assert_refused(cfg, {"moe.topk.grown_groups": 9}, "moe.topk.grown_groups=9")


def _plain(cfg):
  """`cfg` as a run of its own (no init source)."""
  c = cfg.copy_and_resolve_references()
  c.init.grow_from = ""
  c.init.grow_select = "all"
  return c
