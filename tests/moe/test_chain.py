"""Chain-of-Experts (moe.chain.rounds): C routing rounds over one MoE layer's experts.

The chained layer against an independent reference, a loop of plain one-round
layers that share the expert weights (every registered router, every dispatcher),
and against a per-token NumPy loop; how the rounds' losses, metrics, state
statistics and global-batch counts combine; the router state updates per round;
decoder causality; parameter and FLOP counts; the rejections.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax import model as lm
from moejax.layout import moe_layer_indices
from moejax.checks import ConfigError
from moejax.compress.merge import check_mergeable
from moejax.compress.prune import check_prunable
from moejax.config import default_config
from moejax.init.upcycle import upcycle_params
from moejax.interop.decoder import export_reasons
from moejax.model.counting import experts_per_token
from moejax.moe import MoELayer
from moejax.moe.chain import router_name
from moejax.moe.dispatch import DISPATCHERS
from moejax.moe.layer import metric_schema_moe
from moejax.moe.routers import ROUTERS, get_router
from moejax.moe.state import update_router_state
from moejax.validation import validate
from tests.conftest import tiny_config

from . import reference as ref

B, L, D, F, E, K = 2, 6, 8, 16, 4, 2
T = B * L


def _moe_cfg(router="topk", rounds=2, dispatch="dropless", **overrides):
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden = router, E, K, F
  c.dispatch, c.capacity_factor = dispatch, float(E)  # capacity: no drops
  c.chain.rounds = rounds
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return ml_collections.FrozenConfigDict(c)


def _plain(cfg):
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.chain.rounds = 1
  c.dispatch = "dense"
  return ml_collections.FrozenConfigDict(c)


def _random_params(layer, x, seed=0):
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.ones(s.shape, s.dtype)
    fan = s.shape[-2] if len(s.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _x(seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, L, D)), jnp.float32)


def _round_params(params, c):
  """A plain layer's params for round c: its router, the chain's shared experts."""
  out = {k: v for k, v in params.items() if not k.startswith("router")}
  if router_name(c) in params:  # thor's routing has no parameters
    out["router"] = params[router_name(c)]
  return out


def _run(cfg, params, x, balance=None):
  """(chained layer outputs, the reference loop of plain layers' per-round outputs)."""
  chain, plain = MoELayer(cfg), MoELayer(_plain(cfg))
  rounds = cfg.chain.rounds

  @jax.jit
  def run(params, x, balance):
    extra = {} if balance is None else {"balance": {"counts": balance}}
    got = chain.apply({"params": params, **extra}, x)
    per_round, xc, carry = [], x, None
    for c in range(rounds):
      extra = {} if balance is None else {"balance": {"counts": balance[c]}}
      y, aux, carry = plain.apply({"params": _round_params(params, c), **extra}, xc,
                                  router_carry=carry)
      per_round.append((y, aux, carry))
      xc = xc + y
    return got, per_round

  return run(params, x, balance)


def _check_combined(cfg, got, per_round):
  """The chained layer = the sum of the rounds; reports combined as moejax/moe/chain.py says."""
  y, aux, carry = got
  np.testing.assert_allclose(y, sum(r[0] for r in per_round), rtol=1e-5, atol=1e-6)
  for key in aux["losses"]:
    want = np.mean([np.asarray(r[1]["losses"][key]) for r in per_round], axis=0)
    np.testing.assert_allclose(aux["losses"][key], want, rtol=1e-5, atol=1e-7, err_msg=key)
  assert sorted(aux["metrics"]) == sorted(m.name for m in metric_schema_moe(cfg))
  # Load over all rounds: each round's counts = load * (valid slots = experts/token * T).
  counts = sum(np.asarray(r[1]["metrics"]["load"], np.float64)
               * float(r[1]["metrics"]["experts_per_token"]) * T for r in per_round)
  load = ref.load_metrics(counts)
  m = aux["metrics"]
  for key in ("load", "load_max_over_mean", "load_cv"):
    np.testing.assert_allclose(m[key], load[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(
      m["experts_per_token"], sum(float(r[1]["metrics"]["experts_per_token"])
                                  for r in per_round), rtol=1e-6)
  for key in sorted(set(m) - {"load", "load_max_over_mean", "load_cv", "experts_per_token"}):
    want = np.mean([np.asarray(r[1]["metrics"][key]) for r in per_round], axis=0)
    np.testing.assert_allclose(m[key], want, rtol=1e-5, atol=1e-7, err_msg=key)
  stats = [r[1]["state_stats"] for r in per_round]
  if any(stats):
    assert sorted(aux["state_stats"]) == [router_name(c) for c in range(len(per_round))]
    for c, s in enumerate(stats):
      for key, v in s.items():
        np.testing.assert_allclose(aux["state_stats"][router_name(c)][key], v, rtol=1e-6)
  else:
    assert aux["state_stats"] == {}
  np.testing.assert_allclose(aux["balance_counts"],
                             np.stack([r[1]["balance_counts"] for r in per_round]))
  if carry is not None:
    np.testing.assert_allclose(carry, per_round[-1][2], rtol=1e-5, atol=1e-6)


CHAINED = sorted(set(ROUTERS) - {"hash"})  # hash: refused (test_rounds_rejected)


@pytest.mark.parametrize("router", CHAINED)
def test_matches_a_loop_of_plain_layers(router):
  """Every router: C = 2 rounds = two plain layers (own routers, shared experts) in a row."""
  cfg = _moe_cfg(router, rounds=2)
  x = _x()
  params = _random_params(MoELayer(cfg), x)
  if router != "thor":  # thor's routing has no parameters
    assert sorted(k for k in params if k.startswith("router")) == ["router", "router_round2"]
  _check_combined(cfg, *_run(cfg, params, x))


def test_every_dispatcher_shared_experts_and_global_balance():
  """Two rounds with shared experts (gated) and global-batch counts per round, every
  dispatcher against the dense reference loop."""
  x = _x(2)
  counts = jnp.asarray(np.random.default_rng(3).integers(1, 9, (2, E)), jnp.float32)
  for dispatch in sorted(DISPATCHERS):
    cfg = _moe_cfg("topk", rounds=2, dispatch=dispatch, num_shared_experts=1,
                   shared_gate=True, balance="switch,global_batch")
    params = _random_params(MoELayer(cfg), x, seed=4)
    got, per_round = _run(cfg, params, x, counts)
    _check_combined(cfg, got, per_round)
    assert float(got[1]["metrics"]["dropped_fraction"]) == 0.0, dispatch


def test_matches_per_token_numpy_loop():
  """topk, 3 rounds, one shared expert: x_c = x_{c-1} + sum_k w SwiGLU_e(x_{c-1}) + shared."""
  cfg = _moe_cfg("topk", rounds=3, num_shared_experts=1)
  layer = MoELayer(cfg)
  x = _x(5)
  params = _random_params(layer, x, seed=6)
  (y, _, _), inter = jax.jit(lambda p, x: layer.apply({"params": p}, x,
                                                      mutable=["intermediates"]))(params, x)
  assert len(inter["intermediates"]["routing"]) == 3  # one sown routing per round
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  sh = p["shared"]
  want = np.zeros((T, D))
  for t, xt in enumerate(np.asarray(x, np.float64).reshape(T, D)):
    xc = xt.copy()
    for c in range(3):
      _, e_A, w_A, _ = ref.topk_route((xc @ p[router_name(c)]["w_gate"])[None], K,
                                      "softmax_topk", True)
      y_c = sum(w * ref.swiglu(xc, p["experts"]["w_gate"][e], p["experts"]["w_up"][e],
                               p["experts"]["w_down"][e]) for e, w in zip(e_A, w_A))
      y_c = y_c + ref.swiglu(xc, sh["w_gate"], sh["w_up"], sh["w_down"])
      want[t] += y_c
      xc = xc + y_c
  np.testing.assert_allclose(np.asarray(y).reshape(T, D), want, rtol=1e-4, atol=1e-5)


def test_router_state_updates_per_round():
  """sigmoid_bias: each round's bias from its own counts; relu: pooled over layers and rounds."""
  cfg = _moe_cfg("sigmoid_bias", rounds=2)
  bias = {n: jnp.asarray(np.random.default_rng(i).standard_normal((3, E)), jnp.float32)
          for i, n in enumerate(("router", "router_round2"))}
  counts = {n: jnp.asarray(np.random.default_rng(9 + i).integers(0, 9, (3, E)), jnp.float32)
            for i, n in enumerate(("router", "router_round2"))}
  state = {"moe_layers": {"block0": {"moe": {n: {"bias": b} for n, b in bias.items()}}}}
  new = update_router_state(state, {n: {"counts": c} for n, c in counts.items()}, cfg)
  rate = cfg.sigmoid_bias.rate
  for n in bias:
    c = np.asarray(counts[n])
    want = np.asarray(bias[n]) + rate * np.sign(c.mean(-1, keepdims=True) - c)
    np.testing.assert_allclose(new["moe_layers"]["block0"]["moe"][n]["bias"], want, rtol=1e-6)

  cfg = _moe_cfg("relu", rounds=2)
  coef = {n: jnp.full((3,), 1e-3, jnp.float32) for n in ("router", "router_round2")}
  active = {"router": [5.0, 9.0, 1.0], "router_round2": [30.0, 2.0, 4.0]}
  stats = {n: {"active": jnp.asarray(a), "pairs": jnp.full((3,), 48.0)}
           for n, a in active.items()}
  state = {"moe_layers": {"block0": {"moe": {n: {"l1_coef": v} for n, v in coef.items()}}}}
  new = update_router_state(state, stats, cfg)["moe_layers"]["block0"]["moe"]
  pooled = {"active": jnp.full((), 51.0), "pairs": jnp.full((), 6 * 48.0)}
  want = get_router("relu").update_state({"l1_coef": coef["router"][0]}, pooled, cfg)
  for n in coef:
    np.testing.assert_allclose(new[n]["l1_coef"], np.full(3, want["l1_coef"]), rtol=1e-6)


@pytest.mark.parametrize("router", ["topk", "recurrent"])
def test_decoder_causality(router):
  """Training-mode logits at positions <= t do not change when later tokens do (recurrent:
  the router carry passes through the rounds and the layers)."""
  cfg = tiny_config(router=router)
  cfg.moe.chain.rounds = 2
  variables = {"params": jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]}
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(
      rng.standard_normal(s.shape) / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 1),
      s.dtype), variables)
  ids = jax.random.randint(jax.random.key(0), (2, cfg.train.seq_len), 0, 256)
  t = 6
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  a, aux = lm.apply(variables, ids, cfg, rng=jax.random.key(5))
  b, _ = lm.apply(variables, ids2, cfg, rng=jax.random.key(5))
  a, b = np.asarray(a), np.asarray(b)
  assert np.all(np.isfinite(a)) and aux["balance_counts"].shape[:2] == (2, 2)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
  np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])


@pytest.mark.parametrize("router,overrides", [
    ("topk", {"num_shared_experts": 1, "shared_gate": True}),
    ("recurrent", {}),
    ("zero_experts", {}),
    ("soft", {}),
])
def test_param_and_flop_counts(router, overrides):
  """Totals equal the initialised tree; each extra round adds a router (total) and a router,
  k experts and the shared experts (active) per MoE layer; FLOPs follow the active count."""
  plain_cfg, cfg = _with(overrides, router), _with(overrides, router)
  cfg.moe.chain.rounds = 3
  plain = lm.param_counts(plain_cfg)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  d, n_moe = 32, 2
  r = get_router(router).param_count(cfg.moe, d)
  moe = p["moe_layers"]["block0"]["moe"]
  assert sum(x.size for x in jax.tree.leaves(moe["router_round3"])) == n_moe * r
  expert = 3 * d * cfg.moe.expert_hidden
  shared = (3 * d * cfg.moe.expert_hidden + d) if overrides else 0
  per_round = get_router(router).experts_per_token(cfg)
  assert experts_per_token(cfg) == 3 * per_round
  assert counts["params_total"] - plain["params_total"] == n_moe * 2 * r
  extra = counts["params_active"] - plain["params_active"]
  assert extra == pytest.approx(n_moe * 2 * (r + per_round * expert + shared))
  assert lm.flops_per_token(cfg) - lm.flops_per_token(plain_cfg) == pytest.approx(6 * extra)


def _with(overrides, router):
  cfg = tiny_config(router=router)
  for key, value in overrides.items():
    cfg.moe[key] = value
  return cfg


@pytest.mark.parametrize("router,rounds,message", [
    ("topk", 0, "positive integer"), ("topk", -2, "positive integer"),
    ("hash", 2, "must be 1 with moe.router='hash'.*same experts in every round"),
])
def test_rounds_rejected(router, rounds, message):
  cfg = tiny_config(router=router)
  cfg.moe.chain.rounds = rounds
  with pytest.raises(ConfigError, match=rf"moe.chain.rounds={rounds} .*{message}"):
    validate(cfg)


def test_tools_with_one_router_per_layer_refuse_a_chain(tmp_path):
  """Pruning, merging, growing and Hugging Face export handle one router per MoE layer."""
  cfg = tiny_config()
  cfg.moe.chain.rounds = 2
  validate(cfg)
  for check in (check_prunable, check_mergeable):
    with pytest.raises(ValueError, match="moe.chain.rounds=2"):
      check(cfg)
  assert any("moe.chain.rounds=2" in r for r in export_reasons(cfg))
  src = tmp_path / "src"
  os.makedirs(src / "checkpoints")
  (src / "config.json").write_text(json.dumps({}))
  cfg.init.grow_from = str(src)
  with pytest.raises(ConfigError, match="moe.chain.rounds=2 .*init.grow_from"):
    validate(cfg)


def test_upcycling_zeroes_every_rounds_router():
  """init.router='zero' zeroes the routers of all rounds."""
  cfg = tiny_config()
  cfg.moe.chain.rounds = 2
  cfg.moe.expert_hidden = cfg.model.ffn_hidden
  dense = tiny_config()
  dense.moe.enabled = False
  ones = lambda c: jax.tree.map(lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(  # noqa: E731
      lambda k: lm.init(k, c), jax.random.key(0))["params"])
  out = upcycle_params(ones(dense), ones(cfg), cfg, router="zero")
  moe = out["moe_layers"]["block0"]["moe"]
  for name in ("router", "router_round2"):
    assert not np.any(np.asarray(moe[name]["w_gate"]))
  assert np.all(np.asarray(moe["experts"]["w_up"]) == 1)


def test_architectures_variant_meets_the_quickstart_budget():
  """configs/architectures.py:chain: 2 rounds of top-1 = the quickstart's top-2 per token."""
  from configs.architectures import get_config  # noqa: PLC0415
  cfg, base = get_config("chain"), get_config("topk")
  validate(cfg)
  assert cfg.moe.chain.rounds == 2
  assert experts_per_token(cfg) == experts_per_token(base) == 2
  extra_routers = len(moe_layer_indices(cfg)) * cfg.model.d_model * cfg.moe.num_experts
  assert lm.flops_per_token(cfg) - lm.flops_per_token(base) == 6 * extra_routers
