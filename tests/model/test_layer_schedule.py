"""Layer-wise expert schedules (moe.layer_schedule): per-layer experts / top-k, stacks by shape."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax import layout
from moejax import model as lm
from moejax.analysis import online
from moejax.analysis import routing as routing_lib
from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.eval.expert_calls import skipped_calls
from moejax.inference import decode
from moejax.layers import RMSNorm
from moejax.model.transformer import Block
from moejax.moe.routers import get_router
from moejax.moe.state import update_router_state
from moejax.parallel import mesh as mesh_lib
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from moejax.validation import validate


def _cfg(kind: str = "pyramid", layers: int = 4, **over) -> ml_collections.ConfigDict:
  """d=16, E=4 (the widest layer), top-2, seq 8; `over`: dotted keys."""
  c = default_config()
  c.name = "sched"
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.ffn_hidden = 16, layers, 2, 32
  c.moe.num_experts, c.moe.top_k, c.moe.expert_hidden = 4, 2, 16
  c.moe.layer_schedule.kind, c.moe.layer_schedule.min_experts = kind, 2
  c.train.steps, c.train.batch_size, c.train.seq_len = 4, 4, 8
  c.train.warmup_steps, c.train.lr = 1, 1e-2
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 1, 2, 1
  c.train.checkpoint_every = 2
  for key, v in over.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _experts(cfg) -> list[int]:
  return [e for e, _ in layout.moe_schedule(cfg)]


def _ids(cfg, seed=0, batch=2):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.train.seq_len), 0, 256)


# --------------------------------------------------------------------------- schedules


def test_generated_schedules_match_hand_computed_lists():
  c = _cfg(layers=16)
  c.moe.num_experts = 8
  assert _experts(c) == [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4
  c.moe.layer_schedule.kind = "reverse_pyramid"
  assert _experts(c) == [8] * 4 + [6] * 4 + [4] * 4 + [2] * 4
  c.moe.layer_schedule.kind, c.moe.layer_schedule.period = "wave", 4
  assert _experts(c) == [2, 6, 8, 6] * 4  # triangle 0, 1/2, 1, 1/2 of 3 levels, halves up
  c.moe.layer_schedule.kind = "pyramid"
  c.model.num_layers = 3  # fewer layers than the 4 levels: spread over 2..8
  assert _experts(c) == [2, 6, 8]
  c.model.num_layers = 1
  assert _experts(c) == [8]
  c = _cfg("list", **{"moe.layer_schedule.experts": "2,4,4,2",
                      "moe.layer_schedule.top_k": "1,2,2,2"})
  assert layout.moe_schedule(c) == ((2, 1), (4, 2), (4, 2), (2, 2))
  assert layout.moe_schedule(_cfg("constant")) == ((4, 2),) * 4


def _generated(kind: str, n: int, m: int, q: int, period: int = 2) -> ml_collections.ConfigDict:
  c = _cfg(kind, layers=n)
  c.moe.num_experts, c.moe.top_k = m * q, 1
  c.moe.layer_schedule.min_experts, c.moe.layer_schedule.period = m, period
  return c


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 24), m=st.integers(1, 4), q=st.integers(1, 5))
def test_pyramid_properties(n, m, q):
  e = _experts(_generated("pyramid", n, m, q))
  assert len(e) == n and e[-1] == m * q and all(x % m == 0 for x in e)
  assert all(a <= b for a, b in zip(e, e[1:])) and min(e) >= m
  if n >= q:
    ceil = lambda a: -(-a // q)  # noqa: E731
    assert [e.count(m * (j + 1)) for j in range(q)] == [  # q stages, sizes within one layer
        ceil((j + 1) * n) - ceil(j * n) for j in range(q)]
  assert _experts(_generated("reverse_pyramid", n, m, q)) == e[::-1]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 24), m=st.integers(1, 4), q=st.integers(2, 5), half=st.integers(1, 6))
def test_wave_properties(n, m, q, half):
  period = 2 * min(half, n - 1)
  e = _experts(_generated("wave", n, m, q, period))
  assert all(e[i] == e[i % period] for i in range(n))  # periodic
  assert e[0] == m and e[period // 2] == m * q  # trough at 0, crest at period / 2
  assert all(e[i] == e[period - i] for i in range(1, min(period, n)) if period - i < n)
  assert all(x % m == 0 and m <= x <= m * q for x in e)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1)]), min_size=1,
                       max_size=12), every=st.integers(1, 2), first=st.integers(0, 1))
def test_stacks_cover_the_schedule_in_order(shapes, every, first):
  """Expanding every stack's steps reproduces the schedule; every layer has one home."""
  c = _cfg("list", layers=first + every * len(shapes), **{
      "moe.layer_schedule.experts": ",".join(str(e) for e, _ in shapes),
      "moe.layer_schedule.top_k": ",".join(str(k) for _, k in shapes),
      "moe.every": every, "moe.first_dense_layers": first, "moe.topk.renormalize": False})
  c.moe.num_experts = max(e for e, _ in shapes)
  c.moe.top_k = max(k for _, k in shapes)
  expanded = [s for stack in layout.moe_stacks(c) for _ in range(stack.steps)
              for s in stack.shapes]
  assert expanded == shapes
  locations = [layout.layer_location(c, i) for i in range(c.model.num_layers)]
  assert len(set(locations)) == c.model.num_layers
  moe_locations = [locations[i] for i in layout.moe_layer_indices(c)]
  assert moe_locations == layout.moe_layer_paths(c)
  assert all(int(block[len("block"):]) % every == 0 for _, block, _ in moe_locations)
  assert sum(s.per_step for s in layout.moe_stacks(c)) <= len(shapes)


@pytest.mark.parametrize("kind, period", [("pyramid", 2), ("reverse_pyramid", 2),
                                          ("wave", 2), ("wave", 4)])
def test_stack_count_is_independent_of_depth(kind, period):
  """Stacks and MoE blocks traced per step stay the same from 8 to 64 MoE layers; the
  initialised parameter tree has the same stacks at 8 and 32 layers."""
  seen = set()
  for n in (8, 16, 32, 64):
    c = _generated(kind, n, 2, 4, period)
    stacks = layout.moe_stacks(c)
    seen.add((len(stacks), tuple(s.shapes for s in stacks)))
  assert len(seen) == 1, seen
  (count, shapes), = seen
  assert count == (4 if kind != "wave" else 1)
  trees = []
  for n in (8, 32):
    c = _generated(kind, n, 2, 4, period)
    p = jax.eval_shape(lambda k, c=c: lm.init(k, c), jax.random.key(0))["params"]
    trees.append({s: sorted(v) for s, v in p.items() if isinstance(v, dict)})
  assert trees[0] == trees[1]


# --------------------------------------------------------------------------- the model


CASES = {  # name: (config, {model layer: (stack, block, step)} written out by hand)
    "pyramid": (dict(kind="pyramid"), {0: ("moe_layers", "block0", 0),
                                       1: ("moe_layers", "block0", 1),
                                       2: ("moe_layers_1", "block0", 0),
                                       3: ("moe_layers_1", "block0", 1)}),
    "wave-dense-first": (dict(kind="wave", layers=5, **{"moe.first_dense_layers": 1}),
                         {0: ("dense_layers", "block0", 0),
                          **{1 + p: ("moe_layers", f"block{p % 2}", p // 2) for p in range(4)}}),
}
EXPERTS = {"pyramid": [2, 2, 4, 4], "wave-dense-first": [2, 4, 2, 4]}


def _reference(cfg, params, ids, where, experts):
  """An explicit python loop over the model's layers: each one Block, unscanned, with its
  parameters sliced from the located stack row; MoE layers built with their own E."""
  frozen = ml_collections.FrozenConfigDict(cfg)
  moe_layers = [i for i in sorted(where) if i >= cfg.moe.first_dense_layers
                and (i - cfg.moe.first_dense_layers) % cfg.moe.every == 0]
  x = jnp.take(params["embed"], ids, axis=0)
  carry, auxes = (x, None), []
  for i in sorted(where):
    stack, block, step = where[i]
    p = jax.tree.map(lambda a, s=step: a[s], params[stack][block])
    shape = (experts[moe_layers.index(i)], cfg.moe.top_k) if i in moe_layers else None
    if shape is not None:
      assert p["moe"]["experts"]["w_up"].shape[0] == shape[0]
    carry, out = Block(frozen, shape is not None, True, shape).apply(
        {"params": p}, carry, ids, {}, None)
    if shape is not None:
      auxes.append((out["losses"], out["moe"]))
  y = RMSNorm(cfg.model.norm_eps).apply({"params": params["final_norm"]}, carry[0])
  return jnp.einsum("bld,dv->blv", y, params["head"], precision="highest"), auxes


@pytest.mark.parametrize("case", list(CASES))
def test_scheduled_model_equals_a_loop_over_per_layer_blocks(case):
  over, where = CASES[case]
  cfg = _cfg(**over)
  validate(cfg)
  assert _experts(cfg) == EXPERTS[case]
  variables = lm.init(jax.random.key(1), cfg)
  ids = _ids(cfg)
  logits, aux = lm.apply(variables, ids, cfg)
  want, auxes = _reference(cfg, variables["params"], ids, where, EXPERTS[case])
  np.testing.assert_allclose(logits, want, rtol=2e-5, atol=2e-5)
  for name in ("load_balance", "z_loss"):
    np.testing.assert_allclose(aux["losses"][name], [ls[name] for ls, _ in auxes], rtol=1e-5)
  for i, (e, (_, moe)) in enumerate(zip(EXPERTS[case], auxes)):
    load = np.asarray(aux["metrics"]["load"][i])
    np.testing.assert_allclose(load[:e], moe["metrics"]["load"], rtol=1e-6)
    np.testing.assert_array_equal(load[e:], 0.0)  # padded to the widest layer
    np.testing.assert_allclose(aux["metrics"]["experts_per_token"][i], 2.0)
  assert len(aux["balance_counts"]) == len(layout.moe_columns(cfg))
  for col, counts in zip(layout.moe_columns(cfg), aux["balance_counts"]):
    assert counts.shape == (len(col.positions), col.shape[0])
  # Causal (dropless dispatch, top-k routing): later tokens change nothing before them.
  t = 4
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  later = lm.apply(variables, ids2, cfg)[0]
  np.testing.assert_array_equal(np.asarray(later[:, :t + 1]), np.asarray(logits[:, :t + 1]))
  assert not np.allclose(later[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("over", [
    dict(kind="pyramid"),
    dict(kind="wave", layers=9, **{"moe.first_dense_layers": 1, "moe.every": 2}),
    dict(kind="list", **{"moe.layer_schedule.experts": "4,2,2,4",
                         "moe.layer_schedule.top_k": "2,1,2,1", "moe.topk.renormalize": False,
                         "moe.num_shared_experts": 1, "model.tie_embeddings": True}),
    dict(kind="reverse_pyramid", **{"moe.router": "recurrent", "moe.expert": "mlp",
                                    "moe.recurrent.hidden": 8}),
    dict(kind="constant", **{"moe.layer_schedule.top_k": "1,2,1,2",
                             "moe.topk.renormalize": False}),
])
def test_param_counts_equal_the_initialised_tree(over):
  cfg = _cfg(**over)
  validate(cfg)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  per_expert = (3 if cfg.moe.expert == "swiglu" else 2) * 16 * 16
  inactive = sum((e - k) * per_expert for e, k in layout.moe_schedule(cfg))
  assert counts["params_active"] == counts["params_total"] - inactive
  flops = (6 * (counts["params_active"] - counts["params_embedding"] + 258 * 16)
           + 6 * cfg.model.num_layers * cfg.train.seq_len * 16)
  assert lm.flops_per_token(cfg) == flops


# --------------------------------------------------------------------------- router state


def test_router_state_updates_each_column_with_its_own_shape():
  """sigmoid_bias (per-expert counts) and relu (pooled over all layers, target k/E per
  layer) against a loop over the layers applying the router's update_state by hand."""
  rng = np.random.default_rng(0)
  for router in ("sigmoid_bias", "relu"):
    cfg = _cfg("wave", **{"moe.router": router, "moe.sigmoid_bias.rate": 0.1})
    shapes = jax.eval_shape(lambda k, c=cfg: lm.init(k, c), jax.random.key(0))["moe_state"]
    variables = {"moe_state": jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(1e-4, 1e-2, a.shape), jnp.float32), shapes)}
    if router == "sigmoid_bias":  # columns of 2 steps: counts [2, E] of top-2 of 8 tokens
      stats = tuple({"counts": jnp.asarray(rng.multinomial(16, [1 / e] * e, 2), jnp.float32)}
                    for e in (2, 4))
    else:
      stats = tuple({"active": jnp.asarray(rng.integers(0, 16, 2), jnp.float32),
                     "pairs": jnp.asarray([8.0 * e] * 2)} for e in (2, 4))
    new = update_router_state(variables["moe_state"], stats, cfg.moe, layout.moe_columns(cfg))
    cls = get_router(router)
    # The wave [2, 4, 2, 4] is one stack: block0 holds MoE layers 0, 2; block1 layers 1, 3.
    where = [("block0", 0, 0), ("block1", 1, 0), ("block0", 0, 1), ("block1", 1, 1)]
    pooled = {k: sum(jnp.sum(s[k]) for s in stats) for k in stats[0]}
    for layer, (block, col, step) in enumerate(where):
      e = [2, 4][layer % 2]
      state = jax.tree.map(lambda a: a[step],
                           variables["moe_state"]["moe_layers"][block]["moe"]["router"])
      st_ = pooled if router == "relu" else jax.tree.map(lambda a: a[step], stats[col])
      moe = ml_collections.ConfigDict(cfg.moe.to_dict())
      moe.num_experts = e
      want = cls.update_state(state, st_, ml_collections.FrozenConfigDict(moe))
      got = jax.tree.map(lambda a: a[step], new["moe_layers"][block]["moe"]["router"])
      for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
        assert got[k].shape == ((e,) if router == "sigmoid_bias" else ())


# --------------------------------------------------------------------------- training


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f]


def test_trainer_trains_logs_and_resumes_exactly(tmp_path):
  """The real trainer: router state per column, global-batch balancing, per-layer logs
  cut to each layer's experts, checkpoints; a run killed after step 2 resumes bit for bit."""
  cfg = _cfg("pyramid", layers=2, **{"moe.router": "sigmoid_bias",
                                     "moe.sigmoid_bias.rate": 0.05,
                                     "moe.balance": "switch,global_batch"})
  assert _experts(cfg) == [2, 4] and len(layout.moe_stacks(cfg)) == 2
  full = str(tmp_path / "full")
  summary = trainer.train(cfg, full)
  assert summary["params_total"] == lm.param_counts(cfg)["params_total"]
  names = set().union(*_rows(full))
  assert {"moe/layer0/load/e1", "moe/layer1/load/e3", "moe/layer1/bias_norm",
          "routing/layer0/load_cv", "routing/layer1/load_cv", "train/global_balance"} <= names
  assert "moe/layer0/load/e2" not in names
  model = routing_lib.load_model(full)
  for stack, e in (("moe_layers", 2), ("moe_layers_1", 4)):
    bias = np.asarray(model.variables["moe_state"][stack]["block0"]["moe"]["router"]["bias"])
    assert bias.shape == (1, e)
    # Top-2 of 2 experts is balanced by construction: no bias step; of 4 it moves.
    assert (np.abs(bias).max() > 0) == (e == 4)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  os.remove(os.path.join(resumed, "summary.json"))
  again = trainer.train(cfg, resumed)
  loss = lambda d: {r["step"]: r["train/loss"] for r in _rows(d) if "train/loss" in r}
  assert loss(resumed) == loss(full)
  assert again["final_val_loss"] == summary["final_val_loss"]


def test_global_batch_balance_with_accumulation_equals_one_batch():
  outs = []
  for accum in (1, 2):
    cfg = _cfg("wave", layers=2, **{"moe.balance": "global_batch", "moe.aux_loss_weight": 1.0,
                                    "train.grad_accum_steps": accum, "train.grad_clip": 0.0})
    tx = make_optimizer(cfg.train)
    state = trainer.init_state(cfg, tx)
    ids = _ids(cfg, 5, batch=4)
    _, out = trainer.make_train_step(cfg, tx)(state, {"inputs": ids,
                                                      "targets": jnp.roll(ids, -1, 1)})
    outs.append(jax.device_get(out["scalars"]))
  for k in ("train/global_balance", "train/total_loss", "train/grad_norm"):
    np.testing.assert_allclose(outs[1][k], outs[0][k], rtol=1e-4)


# --------------------------------------------------------------------------- readers


def test_capture_expert_calls_and_decoding():
  """Routing capture by group of equal shape, counted expert calls per layer's top-k, and
  cached decoding with a trace against the full forward."""
  cfg = _cfg("list", **{"moe.layer_schedule.experts": "2,4,4,2",
                        "moe.layer_schedule.top_k": "1,2,2,2", "moe.topk.renormalize": False})
  validate(cfg)
  variables = lm.init(jax.random.key(3), cfg)
  model = routing_lib.Model(cfg=cfg, variables=variables)
  ids = np.asarray(_ids(cfg, 1, batch=4))
  assert routing_lib.layer_groups(cfg) == {(2, 1): [0], (4, 2): [1, 2], (2, 2): [3]}
  with pytest.raises(ValueError, match="moe.layer_schedule.kind='list'.*pass layers="):
    routing_lib.capture(model, ids)
  with pytest.raises(ValueError, match="different"):
    routing_lib.capture(model, ids, layers=[0, 1])
  r = routing_lib.capture(model, ids, layers=[1, 2])
  assert r.num_experts == 4 and r.top_k == 2 and r.selected_NxBxLxE.shape == (2, 4, 8, 4)
  assert (r.experts_per_token() == 2).all()
  metrics, routings = online.eval_metrics(cfg, variables, ids)
  assert len(routings) == 3 and {f"routing/layer{i}/load_cv" for i in range(4)} <= set(metrics)
  calls = skipped_calls(cfg, variables, [ids[0], ids[1, :5]], batch_size=2)
  assert calls["possible_calls"] == 13 * (1 + 2 + 2 + 2) == calls["expert_calls"]
  dec = decode.Decoder(cfg, variables)
  prompt = [5, 9, 17]
  gens, w = dec.generate([prompt], max_new_tokens=3, trace=True)
  seq = np.asarray([prompt + gens[0].tokens.tolist()], np.int32)
  logits, _ = lm.apply(variables, seq, cfg)  # greedy: each token the argmax before it
  np.testing.assert_array_equal(gens[0].tokens, np.argmax(logits[0, 2:5], -1))
  assert w.shape == (3, 4, 4)
  np.testing.assert_array_equal(w[:, [0, 3], 2:], 0.0)  # the 2-expert layers
  assert ((w > 0).sum(-1) == [1, 2, 2, 2]).all()  # each layer's own top-k
  # The decoder's trace is the routing capture gives the same tokens (layers of one shape).
  for layers, rows in (([0], [0]), ([1, 2], [1, 2]), ([3], [3])):
    r = routing_lib.capture(model, seq, layers=layers)
    e = r.num_experts
    np.testing.assert_allclose(r.weights_NxBxLxE[:, 0, 3:6].transpose(1, 0, 2),
                               w[:, rows, :e], atol=1e-5)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("over, match", [
    (dict(kind="zigzag"), r"moe.layer_schedule.kind='zigzag'.*allowed"),
    (dict(kind="list", **{"moe.layer_schedule.experts": "2,4,4"}),
     r"moe.layer_schedule.experts='2,4,4'.*3 entries.*4 MoE layers"),
    (dict(kind="list", **{"moe.layer_schedule.experts": "2,4,x,4"}),
     r"moe.layer_schedule.experts.*comma-separated positive integers"),
    (dict(kind="list", **{"moe.layer_schedule.experts": "2,2,2,2"}),
     r"moe.layer_schedule.experts.*largest entry must be moe.num_experts=4"),
    (dict(kind="pyramid", **{"moe.layer_schedule.experts": "2,2,4,4"}),
     r"moe.layer_schedule.experts.*must be '' unless"),
    (dict(kind="pyramid", **{"moe.layer_schedule.top_k": "2,3,2,2", "moe.top_k": 3}),
     r"moe.layer_schedule.top_k=.*model layer 1\).*top-k 3 of its 2 experts"),
    (dict(kind="pyramid", **{"moe.layer_schedule.top_k": "1,2,1,1",
                             "moe.topk.renormalize": False, "moe.top_k": 1}),
     r"moe.layer_schedule.top_k.*largest entry must be moe.top_k=1"),
    (dict(kind="pyramid", **{"moe.layer_schedule.min_experts": 1}),
     r"moe.layer_schedule.min_experts=1.*top-k 2 of its 1 experts"),
    (dict(kind="pyramid", **{"moe.layer_schedule.min_experts": 3}),
     r"moe.layer_schedule.min_experts=3.*dividing moe.num_experts=4"),
    (dict(kind="wave", **{"moe.layer_schedule.period": 3}),
     r"moe.layer_schedule.period=3.*even"),
    (dict(kind="wave", **{"moe.layer_schedule.period": 8}),
     r"moe.layer_schedule.period=8.*allowed: period <= 6"),
    (dict(kind="pyramid", **{"parallel.expert": 4}),
     r"parallel.expert=4.*model layer 0 2 experts"),
    (dict(kind="pyramid", **{"moe.num_router_experts": 8}), r"moe.num_router_experts=8"),
    (dict(kind="pyramid", **{"moe.quant.scheme": "sym", "moe.quant.experts8": 4,
                             "moe.quant.group_size": 8}),
     r"moe.quant.scheme='sym'.*moe.layer_schedule.kind='pyramid'"),
    (dict(kind="pyramid", **{"moe.pool.kind": "global", "moe.pool.size": 8}),
     r"moe.pool.kind='global'.*moe.layer_schedule.kind='pyramid'"),
    (dict(kind="pyramid", **{"moe.chain.rounds": 2}),
     r"moe.chain.rounds=2.*moe.layer_schedule.kind='pyramid'"),
    (dict(kind="pyramid", **{"moe.router": "group_limited", "moe.group_limited.num_groups": 4,
                             "moe.group_limited.top_groups": 2}),
     r"model layers \[0, 1\] 2 experts.*moe.group_limited.num_groups"),
])
def test_bad_schedules_are_refused_naming_the_key(over, match):
  with pytest.raises(ConfigError, match=match):
    validate(_cfg(**over))


def test_readers_of_one_moe_stack_refuse_a_schedule(tmp_path):
  from moejax.compress.calibrate import calibrate  # noqa: PLC0415
  from moejax.compress.method import check_routed_experts  # noqa: PLC0415
  from moejax.interop.decoder import export_reasons  # noqa: PLC0415

  cfg = _cfg("pyramid")
  assert not layout.is_uniform(cfg) and layout.is_uniform(_cfg("constant"))
  with pytest.raises(ValueError, match="moe.layer_schedule.kind='pyramid'.*prune"):
    check_routed_experts(cfg, "prune")
  assert any("moe.layer_schedule.kind='pyramid'" in r for r in export_reasons(cfg))
  with pytest.raises(ConfigError, match="moe.layer_schedule.kind='pyramid'.*calibration"):
    calibrate(routing_lib.Model(cfg=cfg, variables={}))
  with pytest.raises(ConfigError, match=r"parallel.expert=-1.*every MoE layer.*gives 2"):
    mesh_lib.resolve_axes({"data": 1, "fsdp": 1, "expert": -1}, 4, num_experts=(2, 4))
  run = tmp_path / "dense"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  bad = _cfg("pyramid")
  bad.init.from_dense = str(run)
  with pytest.raises(ConfigError, match="init.from_dense=.*moe.layer_schedule.kind='pyramid'"):
    validate(bad)


def test_architectures_schedule_variant():
  """configs/architectures.py:schedule is the quickstart with a 4, 4, 8, 8 pyramid: fewer
  total parameters than the topk row, the same routed experts per token."""
  from configs.architectures import get_config  # noqa: PLC0415

  cfg, ref = get_config("schedule"), get_config("topk")
  validate(cfg)
  assert layout.moe_schedule(cfg) == ((4, 2), (4, 2), (8, 2), (8, 2))
  c, r = lm.param_counts(cfg), lm.param_counts(ref)
  expert = 3 * 128 * 256
  assert r["params_total"] - c["params_total"] == 8 * expert + 2 * 4 * 128  # experts, routers
  assert r["params_active"] - c["params_active"] == 2 * 4 * 128  # router columns only
