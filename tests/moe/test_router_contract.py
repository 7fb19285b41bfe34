"""The router contract (moejax/moe/routers/base.py), for every registered router.

Parametrized over `ROUTERS` (plus option variants), so a router added later
is picked up automatically; it only needs a line in `VALID_RULES` saying how
many assignment slots it marks valid. Checks: assignment shapes, dtypes and
ranges; weights non-negative and finite; the valid-slot rule; parameter
count; gradients reach every router parameter; jit; every dispatcher agrees
with `dense`; the declared metrics, losses and state are what it reports;
probabilities exactly when it declares `returns_probs`; the declared
per-expert embedding (`expert_embedding`) is [E, D] on its params;
decoder causality inside the model's layer scan as the router declares it
(`is_causal`: the expert-choice "batch" grouping is asserted NOT causal);
and `decode_refusal`: a router that accepts decoding routes every token
alone exactly as inside its batch, one that refuses does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax import model as lm
from moejax import schedules
from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe.layer import aux_losses, metric_schema
from moejax.moe.dispatch import DISPATCHERS
from moejax.moe.routers import ROUTERS, get_router
from moejax.moe.routers import expert_choice as ec
from moejax.moe.types import Assignment, SoftAssignment
from moejax.schedules import SCHEDULE
from moejax.train.optimizer import FROZEN_PREFIX
from tests.conftest import tiny_config

B, L, D, F, E, K = 2, 6, 8, 16, 4, 2
T = B * L


def _topk_picks(probs_TxE, k):
  """[T, k] experts by descending probability, ties to the lower index."""
  return np.argsort(-np.asarray(probs_TxE, np.float64), axis=1, kind="stable")[:, :k]


def _thor_count(cfg, out, b, l):
  """Every slot is live: T * k in training, T * E ("average") or T ("single") at eval."""
  n = out.assignment.num_slots
  assert n in (b * l * cfg.top_k, b * l * (cfg.num_experts if cfg.thor.inference == "average"
                                           else 1)), n
  return n


def _top_p_count(cfg, probs_TxE):
  n = 0
  for row in np.asarray(probs_TxE, np.float64):
    mass, used = 0.0, 0
    for v in sorted(row, reverse=True):
      if mass >= cfg.top_p.p or used == cfg.top_p.max_k:
        break
      mass, used = mass + v, used + 1
    n += used
  return n


def _live_per_token(out, t, lo, hi):
  """The valid slots, each token with between lo and hi (its live choices come first)."""
  a = out.assignment
  live_TxC = np.asarray(a.valid).reshape(-1, t).T
  per_token = live_TxC.sum(1)
  assert np.all(per_token >= lo) and np.all(per_token <= hi), per_token
  assert np.all(live_TxC[:, :-1] >= live_TxC[:, 1:]), "a live choice after a dead one"
  return int(per_token.sum())


# Router name -> number of valid slots, from (moe config, RouterOutput, B, L).
VALID_RULES = {
    "topk": lambda cfg, out, b, l: b * l * cfg.top_k,
    "group_limited": lambda cfg, out, b, l: b * l * cfg.top_k,
    "hash": lambda cfg, out, b, l: b * l * cfg.top_k,
    "expert_choice": lambda cfg, out, b, l: ec.num_slots(cfg, (b, l)),
    "null_experts": lambda cfg, out, b, l: int(
        np.sum(_topk_picks(out.probs_TxE, cfg.top_k) < cfg.num_experts)),
    # FFN picks only (the initial budget bias is 0: the top-k of the probabilities).
    "zero_experts": lambda cfg, out, b, l: int(
        np.sum(_topk_picks(out.probs_TxE, cfg.top_k) < cfg.num_experts)),
    "top_p": lambda cfg, out, b, l: _top_p_count(cfg, out.probs_TxE),
    "sigmoid_bias": lambda cfg, out, b, l: b * l * cfg.top_k,
    "thor": _thor_count,
    "bip": lambda cfg, out, b, l: b * l * cfg.top_k,
    "bip_causal": lambda cfg, out, b, l: b * l * cfg.top_k,
    "recurrent": lambda cfg, out, b, l: b * l * cfg.top_k,
    # Every positive gate, less the overflow past relu.max_k.
    # The first k_t choices of every token (k_t on the ramp; eval_k = k_end at eval).
    "smoe_dropout": lambda cfg, out, b, l: _live_per_token(out, b * l, 1, cfg.top_k),
    # While annealing: every expert over the threshold, at least the best; eval: top-k.
    "dts": lambda cfg, out, b, l: _live_per_token(out, b * l, 1, cfg.num_experts),
    "relu": lambda cfg, out, b, l: round(float(out.state_stats["active"])
                                         * (1 - float(out.metrics["overflow_fraction"]))),
}
# Router params that get no gradient in a lone layer: the recurrent router's
# previous state is 0 there, so its shared GRU's w_hh is unused.
NO_GRAD_ALONE = {"recurrent": ("router_gru_w_hh",)}

# Option variants tested besides each router's defaults.
VARIANTS = {
    "topk": [{"topk.noise": "gaussian"}],
    "group_limited": [{"group_limited.mode": "balanced"}],
    "expert_choice": [{"expert_choice.group": "batch"}],
    "thor": [{"thor.inference": "single"}],
    "sigmoid_bias": [{"sigmoid_bias.num_groups": 2, "sigmoid_bias.top_groups": 1,
                      "sigmoid_bias.renormalize": False},
                     {"sigmoid_bias.update_rule": "proportional",
                      "sigmoid_bias.schedule": "inv_sqrt"}],
    "zero_experts": [{"zero_experts.target": 1.5, "zero_experts.renormalize": False}],
    "smoe_dropout": [{"smoe_dropout.ramp_stop": 0}],  # past the ramp: k_end experts
    "dts": [{"dts.anneal_stop": 0}, {"dts.gumbel": False}],  # sparse top-k; no noise
}
STEP = 3  # the optimizer step whose schedule values training mode uses
# Capacity dispatch must drop nothing to equal `dense`: E / k suffices for
# token-choice routers (each token uses an expert at most once); expert
# choice already fills every expert exactly with capacity_factor = 1.
CAPACITY_FACTOR = {"expert_choice": 1.0}

CASES = [pytest.param(name, ov, id=name + "".join(f"-{v}" for v in ov.values()))
         for name in sorted(ROUTERS) for ov in [{}] + VARIANTS.get(name, [])]


def _set(cfg_moe, overrides):
  for key, value in overrides.items():
    node = cfg_moe
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value


def _moe_cfg(name, overrides, dispatch="dense") -> ml_collections.FrozenConfigDict:
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden = name, E, K, F
  c.dispatch = dispatch
  c.capacity_factor = CAPACITY_FACTOR.get(name, float(E))
  _set(c, overrides)
  return ml_collections.FrozenConfigDict(c)


def _full(cfg_moe) -> ml_collections.ConfigDict:
  """A full config around a `moe` config (what the module-level declarations read)."""
  c = default_config()
  c.moe = ml_collections.ConfigDict(cfg_moe.to_dict())
  return c


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 256, (B, L)), jnp.int32)
  return x, ids


def _check_router_output(name, cfg, out) -> None:
  """Shapes, dtypes, ranges, the valid-slot rule, probabilities and losses."""
  a = out.assignment
  if isinstance(a, SoftAssignment):
    assert a.token.size == T and a.dispatch.shape[:2] == a.token.shape  # [G, M, S]
    assert a.combine.shape == a.dispatch.shape
    for arr in (a.dispatch, a.combine):
      assert arr.dtype == jnp.float32 and np.all(np.isfinite(arr)) and np.all(arr >= 0)
  else:
    assert isinstance(a, Assignment)
    n = a.num_slots
    for arr, dt in ((a.token, jnp.int32), (a.expert, jnp.int32),
                    (a.weight, jnp.float32), (a.valid, jnp.bool_)):
      assert arr.shape == (n,) and arr.dtype == dt
    tok, exp, w = np.asarray(a.token), np.asarray(a.expert), np.asarray(a.weight)
    assert tok.min() >= 0 and tok.max() < T and exp.min() >= 0 and exp.max() < E
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    if name not in VALID_RULES:
      pytest.fail(f"router {name!r}: add its valid-slot rule to VALID_RULES")
    assert int(np.sum(np.asarray(a.valid))) == VALID_RULES[name](cfg, out, B, L)
  if out.probs_TxE is not None:
    p = np.asarray(out.probs_TxE)
    assert p.dtype == np.float32 and p.shape[0] == T and p.shape[1] >= E
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    if out.balance_counts_E is not None:
      assert out.balance_counts_E.shape == (p.shape[1],)
  if out.logits_TxE is not None:
    assert out.logits_TxE.shape == out.probs_TxE.shape
  for key, loss in out.losses.items():
    assert loss.shape == () and np.isfinite(loss), key
  zero = get_router(name).zero_computation(cfg)
  if zero is None:
    assert out.zero_weights_TxZ is None
  else:  # zero-computation picks: the probability columns after the E experts
    w = np.asarray(out.zero_weights_TxZ)
    assert w.shape == (T, zero.total) and w.dtype == np.float32
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    picks = _topk_picks(out.probs_TxE, cfg.top_k)
    assert np.array_equal(w > 0, np.stack([np.any(picks == E + z, axis=1)
                                           for z in range(zero.total)], axis=1))


def _random_params(init, seed=1) -> dict:
  """Random {"params"} with the structure `init(key)` gives, without compiling it.

  Shapes come from `jax.eval_shape` (tracing only: compiling a Flax init,
  with its truncated-normal draws, costs more than the forward pass here);
  values: fan-in scaled normals for matrices, ones for `scale` leaves, zeros
  for other vectors. Non-trained collections ("moe_state") are left out:
  routers then use their initial state, as in a fresh model.
  """
  shapes = jax.eval_shape(init, jax.random.key(0))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.ones(s.shape, s.dtype)
    if len(s.shape) < 2:
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), s.dtype)

  return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


@pytest.mark.parametrize("name,overrides", CASES)
def test_router_contract(name, overrides):
  """The router alone (eval and training mode) and inside the MoE layer, one jit.

  The lone router runs on the layer's own router variables; every dispatcher
  must give the `dense` result; gradients of output + aux losses (training
  mode) must reach every router parameter.
  """
  cfgs = {d: _moe_cfg(name, overrides, dispatch=d) for d in sorted(DISPATCHERS)}
  cfg = cfgs["dense"]
  cls = get_router(name)
  router = cls(cfg)
  layers = {d: MoELayer(c) for d, c in cfgs.items()}
  x, ids = _inputs(1)
  x_TxD, ids_T = x.reshape(T, D), ids.reshape(T)
  variables = _random_params(lambda k: layers["dense"].init(k, x, token_ids_BxL=ids))
  r = jnp.asarray(np.random.default_rng(2).standard_normal((B, L, D)), jnp.float32)

  # A router's schedules reach it, as in the model, in the dict shared by the layers.
  scheds = cls.schedules(cfg)
  shared = {SCHEDULE: schedules.values(scheds, STEP)} if scheds else None

  @jax.jit
  def run(variables, key):
    rv = {c: tree["router"] for c, tree in variables.items() if "router" in tree}
    alone = (router.apply(rv, x_TxD, shape_BxL=(B, L), token_ids=ids_T),
             router.apply(rv, x_TxD, shape_BxL=(B, L), token_ids=ids_T,
                          deterministic=False, rngs={"router": key}, shared=shared))
    outs = {d: layer.apply(variables, x, token_ids_BxL=ids)[:2]
            for d, layer in layers.items()}

    def objective(p):
      y, aux, _ = layers["dense"].apply({**variables, "params": p}, x, token_ids_BxL=ids,
                                        deterministic=False, rngs={"router": key},
                                        shared=shared)
      return jnp.sum(y * r) + sum(jnp.sum(v) for v in aux["losses"].values())

    return alone, outs, jax.grad(objective)(variables["params"])

  alone, outs, grads = run(variables, jax.random.key(3))
  for out in alone:
    _check_router_output(name, cfg, out)
  router_params = variables["params"].get("router", {})
  # A lone router holds its shared params too.
  assert sum(p.size for p in jax.tree.leaves(router_params)) == \
      cls.param_count(cfg, D) + cls.shared_param_count(cfg, D)
  embedding = cls.expert_embedding(cfg)
  if embedding is not None:
    emb = embedding(router_params)
    assert emb.shape == (E, D) and emb.dtype == jnp.float32
  for out in alone:
    assert (out.probs_TxE is not None) == cls.returns_probs
  # What it reports is what it declares (the layer also checks this at trace time).
  for out in alone:
    assert sorted(out.metrics) == sorted(m.name for m in cls.metrics(cfg))
    assert sorted(out.losses) == sorted(a.name for a in cls.aux_losses(cfg))
    assert (out.state_stats != {}) <= bool(cls.state_names(cfg)), "stats without state"
  y0, aux0 = outs["dense"]
  assert sorted(aux0["metrics"]) == sorted(m.name for m in metric_schema(_full(cfg)))
  assert sorted(aux0["losses"]) == sorted(a.name for a in aux_losses(_full(cfg)))
  shapes = jax.eval_shape(lambda k: layers["dense"].init(k, x, token_ids_BxL=ids),
                          jax.random.key(0))
  state = shapes.get("moe_state", {}).get("router", {})
  assert sorted(state) == sorted(cls.state_names(cfg))
  for flag in (cls.choice_major_slots, cls.uses_carry, cls.adaptive, cls.pool_stats_over_layers,
               cls.returns_probs):
    assert isinstance(flag, bool)

  y_dense = np.asarray(outs["dense"][0])
  assert np.all(np.isfinite(y_dense))
  for d, (y, aux) in outs.items():
    assert float(aux["metrics"]["dropped_fraction"]) == 0.0, d
    np.testing.assert_allclose(np.asarray(y), y_dense, rtol=1e-5, atol=1e-5, err_msg=d)
  router_grads = grads.get("router", {})
  if not jax.tree.leaves(router_grads):  # a router without trainable params
    assert cls.param_count(cfg, D) == 0
  for path, g in jax.tree_util.tree_leaves_with_path(router_grads):
    if path[-1].key in NO_GRAD_ALONE.get(name, ()):
      continue
    g = np.asarray(g)
    if str(path[-1].key).startswith(FROZEN_PREFIX):  # read under stop_gradient
      assert np.all(g == 0), jax.tree_util.keystr(path)
      continue
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


# Causality runs each router's defaults plus the variants that change what a
# token's routing can depend on (training noise; the batch-wide grouping).
CAUSAL_CASES = [c for c in CASES
                if not c.values[1] or c.values[1] in
                ({"topk.noise": "gaussian"}, {"expert_choice.group": "batch"})]


@pytest.mark.parametrize("name,overrides", CAUSAL_CASES)
def test_decoder_causality_in_model(name, overrides):
  """Training-mode logits at positions <= t do not change when later tokens do."""
  cfg = tiny_config(router=name)
  _set(cfg.moe, overrides)
  variables = _random_params(lambda k: lm.init(k, cfg))
  ids = jax.random.randint(jax.random.key(0), (2, cfg.train.seq_len), 0, 256)
  t = 6
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  key = jax.random.key(5)
  a, aux = lm.apply(variables, ids, cfg, rng=key)
  b, _ = lm.apply(variables, ids2, cfg, rng=key)
  a, b = np.asarray(a), np.asarray(b)
  assert np.all(np.isfinite(a)) and aux["losses"]["load_balance"].shape == (2,)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
  if not get_router(name).is_causal(cfg):
    # All tokens of the batch compete for experts: earlier logits see the change.
    assert not np.allclose(a[:, :t + 1], b[:, :t + 1])
  else:
    np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])


@pytest.mark.parametrize("name,overrides", CASES)
def test_decode_refusal(name, overrides):
  """Decodable routers route every token alone as inside its batch; refusals explain why.

  Eval mode, the MoE layer with dense dispatch: the [B, L] output at every
  token equals the layer applied to that token alone ([1, 1], its own id).
  A router that refuses names itself and a reason, and alone it routes
  differently (what decoding would silently change).
  """
  cfg = _moe_cfg(name, overrides)
  cls = get_router(name)
  refusal = cls.decode_refusal(_full(cfg))
  layer = MoELayer(cfg)
  x, ids = _inputs(4)
  variables = _random_params(lambda k: layer.init(k, x, token_ids_BxL=ids))
  apply = jax.jit(lambda v, x, ids: layer.apply(v, x, token_ids_BxL=ids)[0])
  together = np.asarray(apply(variables, x, ids)).reshape(T, D)
  one = jax.jit(jax.vmap(lambda xt, it: apply(variables, xt[None, None], it[None, None])[0, 0]))
  alone = np.asarray(one(x.reshape(T, D), ids.reshape(T)))
  if refusal is None:
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
  else:
    assert isinstance(refusal, str) and name in refusal and len(refusal) > 40
    assert not np.allclose(alone, together, rtol=1e-3, atol=1e-4)
