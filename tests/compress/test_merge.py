"""Expert merging: permuted copies merge back exactly, the pieces equal slow NumPy references,
the expert map routes as an unmerged model with duplicated experts would."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.analysis import Model
from moejax.checks import ConfigError
from moejax.compress import calibrate
from moejax.compress import merge as merge_lib
from moejax.compress.merge import merge
from moejax.compress.prune import check_options as prune_check
from moejax.inference.decode import Decoder
from moejax.moe import layer as moe_layer
from moejax.moe.experts import get_family
from moejax.validation import validate
from tests.compress import reference as ref
from tests.conftest import tiny_config

MOE = ref.MOE
MAP = (moe_layer.EXPERT_MAP,) + MOE + ("map",)


def _ids(b=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, 16)).astype(np.int32)


def _node(tree, path=MOE):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree.get(path[0], {}), path[1:], value)}


def _mlp_sigmoid_bias():
  """mlp experts with biases (an F-less leaf), sigmoid_bias (router state), a shared expert."""
  c = tiny_config(router="sigmoid_bias", expert="mlp", num_shared_experts=1)
  c.moe.mlp.bias = True
  return c


def _perturbed(cfg, seed):
  """Initial variables with every float leaf perturbed (biases and router state start at 0)."""
  v = lm.init(jax.random.key(seed), cfg)
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x for x, k in zip(leaves, keys)])


def permuted_copies(cfg, seed=0):
  """(variables, perms [P, 4, F]) of an E=4 model where expert 1 is expert 0 and expert 3
  expert 2 with their hidden neurons permuted (expert e = source perm[p, e] neurons of its
  twin); their router columns are near copies, so router-logit grouping pairs them."""
  v = jax.tree.map(np.array, _perturbed(cfg, seed))
  fam = get_family(cfg.moe)
  rng = np.random.default_rng(seed)
  experts = _node(v["params"])["experts"]
  p_layers, f = 2, cfg.moe.expert_hidden
  perms = np.tile(np.arange(f), (p_layers, 4, 1))
  for p in range(p_layers):
    for twin, src in ((1, 0), (3, 2)):
      perms[p, twin] = rng.permutation(f)
      for name, leaf in fam.leaves().items():
        dims = [d for d in leaf.dims if d != "E"]
        ax = leaf.expert_axis
        one = np.take(experts[name][p], src, axis=ax)
        if "F" in dims:
          one = np.take(one, perms[p, twin], axis=dims.index("F"))
        idx = (slice(None),) * ax + (twin,)
        experts[name][p][idx] = one
  w = _node(v["params"])["router"]["w_gate"]
  w[:, :, 1] = w[:, :, 0] + 0.05 * rng.standard_normal(w.shape[:2])
  w[:, :, 3] = w[:, :, 2] + 0.05 * rng.standard_normal(w.shape[:2])
  return v, perms


def _calib(cfg, v, counts=(6, 1, 6, 1)):
  """A calibration of the model on random ids, with `counts` as the routed counts (so the
  anchors are experts 0 and 2)."""
  c = calibrate(Model(cfg, v), _ids())
  return dataclasses.replace(c, counts_NxE=np.tile(np.asarray(counts, np.int64), (2, 1)))


def _expert(v, cfg, p, e):
  fam = get_family(cfg.moe)
  return {k: np.take(np.asarray(x[p]), e, axis=fam.leaves()[k].expert_axis)
          for k, x in _node(v["params"])["experts"].items()}


@pytest.mark.parametrize("make,align_by", [(tiny_config, "weights"),
                                           (tiny_config, "activations"),
                                           (_mlp_sigmoid_bias, "weights")])
def test_permuted_copies_merge_back_exactly(make, align_by):
  cfg = make()
  v, perms = permuted_copies(cfg)
  m = merge(cfg, v, _calib(cfg, v), 2, align=True, align_by=align_by)
  assert m.cfg.moe.num_experts == 2 and m.cfg.moe.num_router_experts == 4
  np.testing.assert_array_equal(m.anchors_NxG, [[0, 2], [0, 2]])
  np.testing.assert_array_equal(m.map_NxR, [[0, 0, 1, 1], [0, 0, 1, 1]])
  np.testing.assert_array_equal(_node(m.variables, MAP), m.map_NxR)
  np.testing.assert_allclose(m.weights_NxE, np.tile([6 / 7, 1 / 7, 6 / 7, 1 / 7], (2, 1)))
  for p in range(2):
    for j, src in enumerate((0, 2)):
      got, want = _expert(m.variables, m.cfg, p, j), _expert(v, cfg, p, src)
      for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
      twin = src + 1  # its alignment undoes the permutation: twin[perm] == source
      np.testing.assert_array_equal(perms[p, twin][m.perm_NxExF[p, twin]], np.arange(32))
  before, _ = lm.apply(v, jnp.asarray(_ids(seed=3)), cfg)
  after, _ = lm.apply(m.variables, jnp.asarray(_ids(seed=3)), m.cfg)
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  if "moe_state" in v:  # the router and its state are untouched
    np.testing.assert_array_equal(_node(m.variables["moe_state"]), _node(v["moe_state"]))
  for part in set(_node(v["params"])) - {"experts"}:  # router, shared experts
    for a, b in zip(jax.tree.leaves(_node(m.variables["params"])[part]),
                    jax.tree.leaves(_node(v["params"])[part])):
      np.testing.assert_array_equal(a, b)


def test_without_alignment_permuted_copies_change_the_output():
  cfg = tiny_config()
  v, _ = permuted_copies(cfg)
  m = merge(cfg, v, _calib(cfg, v), 2, align=False)
  assert m.perm_NxExF is None
  np.testing.assert_array_equal(m.map_NxR, [[0, 0, 1, 1], [0, 0, 1, 1]])
  want = {k: (6 * a + b) / 7 for (k, a), b in zip(
      _expert(v, cfg, 0, 0).items(), _expert(v, cfg, 0, 1).values())}
  for k, x in _expert(m.variables, m.cfg, 0, 0).items():
    np.testing.assert_allclose(x, want[k], rtol=1e-6, atol=1e-7)
  before, _ = lm.apply(v, jnp.asarray(_ids(seed=3)), cfg)
  after, _ = lm.apply(m.variables, jnp.asarray(_ids(seed=3)), m.cfg)
  assert float(jnp.max(jnp.abs(after - before))) > 1e-3


# --------------------------------------------------------------------------- references


def _pearson(a, b):
  """Correlation of two vectors by sums (0 for a constant one)."""
  n = len(a)
  ma, mb = sum(a) / n, sum(b) / n
  num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
  da = sum((x - ma) ** 2 for x in a) ** 0.5
  db = sum((y - mb) ** 2 for y in b) ** 0.5
  return 0.0 if da == 0 or db == 0 else num / (da * db)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(4, 7), st.integers(0, 2 ** 31 - 1))
def test_alignment_is_the_best_permutation_by_brute_force(f, k, seed):
  rng = np.random.default_rng(seed)
  a, b = rng.standard_normal((f, k)), rng.standard_normal((f, k))
  corr = [[_pearson(a[i], b[j]) for j in range(f)] for i in range(f)]
  np.testing.assert_allclose(merge_lib.correlation(a, b), corr, atol=1e-12)
  score = {p: sum(corr[i][p[i]] for i in range(f)) for p in itertools.permutations(range(f))}
  best = max(score, key=score.get)
  perm = merge_lib.align_permutation(a, b)
  assert sorted(perm.tolist()) == list(range(f))
  np.testing.assert_allclose(score[tuple(perm.tolist())], score[best], atol=1e-12)
  # b's rows shuffled: the alignment finds the shuffle back
  shuffle = rng.permutation(f)
  np.testing.assert_array_equal(merge_lib.align_permutation(b[shuffle], b)[np.argsort(shuffle)],
                                np.arange(f))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), st.integers(0, 2 ** 31 - 1))
def test_frequency_weighted_average_equals_loops(counts, seed):
  rng = np.random.default_rng(seed)
  experts = [{"w": rng.standard_normal((3, 2)).astype(np.float32),
              "b": rng.standard_normal(3).astype(np.float32)} for _ in counts]
  floored = [c if c > merge_lib.ZERO_COUNT_FLOOR else merge_lib.ZERO_COUNT_FLOOR
             for c in counts]
  weights = [c / sum(floored) for c in floored]
  np.testing.assert_allclose(merge_lib.merge_weights(np.asarray(counts)), weights, rtol=1e-12)
  if not any(counts):
    np.testing.assert_allclose(weights, np.full(len(counts), 1 / len(counts)))
  got = merge_lib.average(experts, merge_lib.merge_weights(np.asarray(counts)))
  for name in ("w", "b"):
    want = np.zeros(experts[0][name].shape)
    for ex, w in zip(experts, weights):
      for idx in np.ndindex(want.shape):
        want[idx] += w * float(ex[name][idx])
    assert got[name].dtype == np.float32
    np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.data())
def test_grouping_partitions_the_experts(e, data):
  n = data.draw(st.integers(1, e - 1))
  seed = data.draw(st.integers(0, 2 ** 31 - 1))
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, 4, e)  # small range: ties
  gate = rng.integers(0, 3, e).astype(np.float64)
  sim = np.round(rng.uniform(-1, 1, (e, e)), 1)  # ties
  anchors = merge_lib.choose_anchors(counts, n, gate)
  ranked = sorted(range(e), key=lambda j: (-counts[j], -gate[j], j))
  assert anchors.tolist() == sorted(ranked[:n])
  group = merge_lib.assign_groups(sim, anchors)
  assert group.shape == (e,) and set(group.tolist()) == set(range(n))  # N non-empty groups
  for g, a in enumerate(anchors):
    assert group[a] == g  # an anchor in its own group
  for j in range(e):
    if j in anchors:
      continue
    best = 0
    for g in range(1, n):
      if sim[j, anchors[g]] > sim[j, anchors[best]]:
        best = g
    assert group[j] == best


def test_router_logit_features_and_similarity_equal_loops():
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((7, 5)), rng.standard_normal((5, 6))
  map_r = np.array([2, 0, 2, 1, 0, 2])
  got = merge_lib.router_logit_features(x, w, map_r, 4)
  for s in range(7):
    logit = [sum(x[s, d] * w[d, r] for d in range(5)) for r in range(6)]
    for e in range(3):
      want = np.log(sum(np.exp(logit[r]) for r in range(6) if map_r[r] == e))
      np.testing.assert_allclose(got[s, e], want, rtol=1e-12)
  assert np.all(got[:, 3] == -np.inf)
  sim = merge_lib.cosine_similarity(got.T)
  for i in range(3):
    for j in range(3):
      a, b = got[:, i], got[:, j]
      want = sum(a * b) / (sum(a * a) ** 0.5 * sum(b * b) ** 0.5)
      np.testing.assert_allclose(sim[i, j], want, rtol=1e-12)
  assert np.all(sim[3] == 0)
  np.testing.assert_array_equal(merge_lib.compose_map(map_r, np.array([1, 1, 0, 0])),
                                [0, 1, 0, 1, 1, 0])


def test_hidden_activations_equal_numpy():
  cfg = tiny_config()
  fam = get_family(cfg.moe)
  rng = np.random.default_rng(1)
  ex = {"w_gate": rng.standard_normal((32, 40)), "w_up": rng.standard_normal((32, 40)),
        "w_down": rng.standard_normal((40, 32))}  # F = 40 > D: two one-hot blocks
  x = rng.standard_normal((5, 32))
  want = ref.silu(x @ ex["w_gate"]) * (x @ ex["w_up"])
  np.testing.assert_allclose(merge_lib.hidden_activations(ex, fam, x), want, rtol=2e-4,
                             atol=2e-4)


def test_merge_equals_a_numpy_merge():
  """Grouping, anchors, alignment and averaging of a trained-looking model, recomputed by
  loops over the merge's own permutations (each a permutation at least as correlated as
  none)."""
  cfg = tiny_config()
  v = _perturbed(cfg, 5)
  calib = calibrate(Model(cfg, v), _ids())
  m = merge(cfg, v, calib, 2)
  moe = ref.moe_params(v)
  for p in range(2):
    logits = calib.inputs_NxSxD[p].astype(np.float64) @ moe["router"]["w_gate"][p]
    norm = np.sqrt((logits ** 2).sum(0))
    sim = (logits.T @ logits) / np.outer(norm, norm)
    ranked = sorted(range(4), key=lambda j: (-calib.counts_NxE[p, j], -calib.gate_NxE[p, j], j))
    anchors = sorted(ranked[:2])
    assert m.anchors_NxG[p].tolist() == anchors
    for j in range(4):
      want = anchors.index(j) if j in anchors else int(np.argmax(sim[j, anchors]))
      assert m.group_NxE[p, j] == want
    for g, a in enumerate(anchors):
      members = [j for j in range(4) if m.group_NxE[p, j] == g]
      counts = [max(float(calib.counts_NxE[p, j]), merge_lib.ZERO_COUNT_FLOOR) for j in members]
      got = _expert(m.variables, m.cfg, p, g)
      for name, axis in (("w_gate", 1), ("w_up", 1), ("w_down", 0)):
        want = np.zeros(got[name].shape)
        for j, c in zip(members, counts):
          perm = m.perm_NxExF[p, j]
          assert sorted(perm.tolist()) == list(range(32))
          want += c / sum(counts) * np.take(moe["experts"][name][p, j], perm, axis=axis)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
      feats = lambda j, perm: np.concatenate(  # noqa: E731
          [moe["experts"]["w_gate"][p, j].T[perm], moe["experts"]["w_up"][p, j].T[perm],
           moe["experts"]["w_down"][p, j][perm]], axis=1)
      ident = np.arange(32)
      for j in members:
        score = lambda perm: sum(_pearson(feats(a, ident)[i], feats(j, perm)[i])  # noqa: E731
                                 for i in range(32))
        assert score(m.perm_NxExF[p, j]) >= score(ident) - 1e-9


# --------------------------------------------------------------------------- the expert map


def expanded(cfg, variables):
  """The merged model as an ordinary one of R experts: router expert r's expert is a copy
  of merged expert map[r] (NumPy gather), no map."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.moe.num_experts, c.moe.num_router_experts = cfg.moe.num_router_experts, 0
  map_pr = np.asarray(_node(variables, MAP))
  fam = get_family(cfg.moe)
  experts = {k: np.stack([np.take(np.asarray(x[p]), map_pr[p], axis=fam.leaves()[k].expert_axis)
                          for p in range(x.shape[0])])
             for k, x in _node(variables["params"])["experts"].items()}
  out = {k: val for k, val in variables.items() if k != moe_layer.EXPERT_MAP}
  out["params"] = _set(variables["params"], MOE + ("experts",), experts)
  return c, out


def _merged_tiny(router="topk", seed=2):
  cfg = tiny_config(router=router, num_experts=2, num_router_experts=4)
  v = _perturbed(cfg, seed)
  return cfg, _set(v, MAP, jnp.asarray([[1, 0, 1, 1], [0, 1, 0, 0]], jnp.int32))


@pytest.mark.parametrize("router", ["topk", "group_limited"])
def test_the_map_routes_as_duplicated_experts_would(router):
  cfg, v = _merged_tiny(router)
  validate(cfg)
  ids = jnp.asarray(_ids(seed=4))
  logits, aux = lm.apply(v, ids, cfg)
  c2, v2 = expanded(cfg, v)
  want, aux2 = lm.apply(v2, ids, c2)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  # balancing sees the router's 4 experts; load metrics the 2 experts behind the map
  np.testing.assert_allclose(aux["balance_counts"], aux2["balance_counts"])
  assert aux["metrics"]["load"].shape == (2, 2)
  load2 = np.asarray(aux2["metrics"]["load"])
  np.testing.assert_allclose(aux["metrics"]["load"],
                             [[load2[0, 1], load2[0, [0, 2, 3]].sum()],
                              [load2[1, [0, 2, 3]].sum(), load2[1, 1]]], rtol=1e-6)
  for k in aux["losses"]:
    np.testing.assert_allclose(aux["losses"][k], aux2["losses"][k], rtol=1e-6)


def test_the_mapped_layer_equals_numpy():
  """One MoE layer with map [1, 0, 1, 1]: a token whose two picks map to one expert gets
  (w1 + w2) f(x) from it."""
  cfg, v = _merged_tiny(seed=6)
  x = np.random.default_rng(0).standard_normal((12, 32)).astype(np.float32)
  one = {"params": jax.tree.map(lambda a: a[0], _node(v["params"])),
         moe_layer.EXPERT_MAP: {"map": _node(v, MAP)[0]}}
  layer = moe_layer.MoELayer(ml_collections.FrozenConfigDict(cfg.moe), "float32")
  y, _, _ = layer.apply(one, jnp.asarray(x)[None])
  p = ref.moe_params(v)
  experts = {k: p["experts"][k][0][[1, 0, 1, 1]] for k in p["experts"]}
  want = ref.topk_swiglu_layer(x.astype(np.float64), p["router"]["w_gate"][0], experts, 2)
  comb, _ = ref.topk_combine(x.astype(np.float64) @ p["router"]["w_gate"][0], 2)
  assert np.any((comb[:, [0, 2, 3]] > 0).sum(1) == 2)  # some token picks two of expert 1's
  np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-4, atol=1e-5)


def test_decoding_and_calibrating_a_merged_model():
  cfg, v = _merged_tiny()
  c2, v2 = expanded(cfg, v)
  prompts = [[5, 9, 200, 17], [3]]
  gens, trace = Decoder(cfg, v).generate(prompts, max_new_tokens=5, trace=True)
  gens2, trace2 = Decoder(c2, v2).generate(prompts, max_new_tokens=5, trace=True)
  for a, b in zip(gens, gens2):
    np.testing.assert_array_equal(a.tokens, b.tokens)
  assert trace.shape[-1] == 2 and trace2.shape[-1] == 4
  np.testing.assert_allclose(trace[:, 0, 0], trace2[:, 0, 1], atol=1e-6)
  np.testing.assert_allclose(trace[:, 1, 1], trace2[:, 1, 1], atol=1e-6)
  calib = calibrate(Model(cfg, v), _ids())
  calib2 = calibrate(Model(c2, v2), _ids())
  assert calib.num_experts == 2 and calib.mean_probs_NxC.shape == (2, 4)
  # tokens per expert: expert 0 is router expert 1 alone; a token counts once for expert 1
  # however many of its router experts 0, 2, 3 it picks; the gate weight adds up
  assert calib.counts_NxE[0, 0] == calib2.counts_NxE[0, 1]
  assert calib2.counts_NxE[0, [0, 2, 3]].max() <= calib.counts_NxE[0, 1] <= calib2.counts_NxE[
      0, [0, 2, 3]].sum()
  np.testing.assert_allclose(calib.gate_NxE[0], [calib2.gate_NxE[0, 1],
                                                 calib2.gate_NxE[0, [0, 2, 3]].sum()], rtol=1e-5)


def test_merging_a_merged_model_composes_the_maps():
  cfg, v = _merged_tiny()
  calib = calibrate(Model(cfg, v), _ids())
  m = merge(cfg, v, calib, 1)
  assert m.cfg.moe.num_experts == 1 and m.cfg.moe.num_router_experts == 4
  np.testing.assert_array_equal(m.map_NxR, np.zeros((2, 4)))
  # merged experts' router logits: the log-sum-exp over their router experts
  feats = merge_lib.router_logit_features(calib.inputs_NxSxD[0],
                                          ref.moe_params(v)["router"]["w_gate"][0],
                                          np.array([1, 0, 1, 1]), 2)
  assert feats.shape == (calib.sampled_tokens, 2) and np.isfinite(feats).all()


@pytest.mark.parametrize("overrides,words", [
    ({"num_router_experts": 3}, ["moe.num_router_experts=3", "more than moe.num_experts=4"]),
    ({"num_router_experts": 4}, ["moe.num_router_experts=4", "allowed: 0"]),
    ({"num_router_experts": -1}, ["moe.num_router_experts=-1", "non-negative integer"]),
    ({"num_router_experts": 8, "router": "soft"}, ["moe.num_router_experts=8", "'soft'"]),
    ({"num_router_experts": 8, "router": "expert_choice"}, ["moe.router='expert_choice'"]),
    ({"num_experts": 1, "num_router_experts": 2, "top_k": 3},
     ["moe.top_k=3", "moe.num_router_experts=2"]),
])
def test_bad_expert_map_configs(overrides, words):
  cfg = tiny_config(**overrides)
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_a_map_runs_top_k_above_the_experts():
  """top_k = 2 router picks onto one expert is fine: both rows go to it."""
  validate(tiny_config(num_experts=1, num_router_experts=4))
  cfg = tiny_config(num_experts=1, num_router_experts=4)
  v = lm.init(jax.random.key(0), cfg)
  c2, v2 = expanded(cfg, v)
  ids = jnp.asarray(_ids(seed=1))
  np.testing.assert_allclose(lm.apply(v, ids, cfg)[0], lm.apply(v2, ids, c2)[0], rtol=1e-5,
                             atol=1e-5)
  assert lm.param_counts(cfg)["params_total"] == sum(x.size for x in jax.tree.leaves(
      v["params"]))


# --------------------------------------------------------------------------- bad input


def _with(cfg, **keys):
  for k, v in keys.items():
    node = cfg
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return cfg


@pytest.mark.parametrize("cfg,kwargs,words", [
    (tiny_config(), {"to": 4}, ["to=4 is invalid", "[1, 3]"]),
    (tiny_config(), {"to": 0}, ["to=0 is invalid"]),
    (tiny_config(), {"to": 2.0}, ["to=2.0 is invalid"]),
    (tiny_config(), {"to": True}, ["to=True is invalid"]),
    (tiny_config(), {"to": 2, "group_by": "cosine"}, ["group_by='cosine'", "router_logits"]),
    (tiny_config(), {"to": 2, "align_by": "gradients"}, ["align_by='gradients'"]),
    (tiny_config(), {"to": 2, "align": "yes"}, ["align='yes'"]),
    (tiny_config(router="soft"), {"to": 2}, ["moe.router='soft' cannot be merged",
                                             "SoftAssignment"]),
    (tiny_config(router="expert_choice"), {"to": 2}, ["moe.router='expert_choice'"]),
    (tiny_config(router="hash"), {"to": 2}, ["moe.router='hash'", "no scores"]),
    (tiny_config(router="top_p"), {"to": 2}, ["moe.router='top_p'", "allowed: ['topk'"]),
    (tiny_config(enabled=False), {"to": 2}, ["not an MoE"]),
    (_with(tiny_config(), **{"moe.quant.scheme": "sym"}), {"to": 2},
     ["moe.quant.scheme='sym'", "merge before quantizing"]),
    (_with(tiny_config(), **{"moe.adapters.enabled": True, "moe.adapters.base": "/b"}),
     {"to": 2}, ["moe.adapters.enabled=True", "merge the base run"]),
    (_with(tiny_config(), **{"moe.topk.copies": 2}), {"to": 2}, ["moe.topk.copies=2"]),
])
def test_bad_options_are_refused_by_name(cfg, kwargs, words):
  with pytest.raises(ValueError) as e:
    merge_lib.check_options(cfg, **kwargs)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_bad_calibration_and_pruning_a_merged_run():
  cfg = tiny_config()
  v = lm.init(jax.random.key(0), cfg)
  calib = calibrate(Model(cfg, v), _ids(), max_tokens=1)
  with pytest.raises(ValueError, match="needs calibration statistics"):
    merge(cfg, v, None, 2)
  with pytest.raises(ValueError, match="calibrate this model"):
    merge(tiny_config(num_experts=8), v, calib, 2)
  empty = dataclasses.replace(calib, inputs_NxSxD=calib.inputs_NxSxD[:, :0])
  with pytest.raises(ValueError, match="group_by='router_logits' need sampled layer inputs"):
    merge(cfg, v, empty, 2)
  merge(cfg, v, empty, 2, group_by="weights")  # grouping and aligning by weights need none
  with pytest.raises(ValueError, match=r"moe.num_router_experts=4 .* prune before merging"):
    prune_check(tiny_config(num_experts=2, num_router_experts=4), "frequency", 0.5)
