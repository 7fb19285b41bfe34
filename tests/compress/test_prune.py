"""Expert pruning: equal to a model rebuilt by hand, criteria equal NumPy references."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.analysis import Model, capture
from moejax.compress import Calibration, calibrate, prune
from moejax.compress.prune import keep_experts, lowest
from tests.compress import reference as ref
from tests.conftest import tiny_config

MOE = ref.MOE


def _ids(b=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, 16)).astype(np.int32)


def _np(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _node(tree, path=MOE):
  for k in path:
    tree = tree[k]
  return tree


def delete_by_hand(variables: dict, removed_NxR: np.ndarray) -> dict:
  """The variables with the removed experts deleted with NumPy: expert leaves are
  [P, E, ...] for the swiglu and mlp families, router leaves [P, D, E], the bias [P, E]."""
  out = _np(variables)
  moe = _node(out["params"])
  per = lambda a, axis: np.stack([np.delete(a[p], r, axis=axis)  # noqa: E731
                                  for p, r in enumerate(removed_NxR)])
  moe["experts"] = {k: per(v, 0) for k, v in moe["experts"].items()}
  moe["router"] = {k: per(v, -1) for k, v in moe["router"].items()}
  if "moe_state" in out:
    node = _node(out["moe_state"])
    node["router"] = {k: per(v, -1) for k, v in node["router"].items()}
  return out


def _with_experts(cfg, e):
  c = cfg.copy_and_resolve_references()
  c.moe.num_experts = e
  return c


def _sigmoid_bias_mlp_shared():
  """sigmoid_bias (per-expert state), mlp experts with biases (leaves of three ranks) and a
  shared expert (must stay whole)."""
  c = tiny_config(router="sigmoid_bias", expert="mlp", num_shared_experts=1)
  c.moe.mlp.bias = True
  return c


def _perturbed(cfg, seed=1):
  """Initial variables with every leaf perturbed (the biases, noise gates and the
  sigmoid_bias state are zero at init, which would hide a wrong deletion)."""
  v = lm.init(jax.random.key(seed), cfg)
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def _group_limited():
  """E=8 in 2 contiguous groups (each token keeps its best group), noisy-gate-free top-k."""
  return tiny_config(router="group_limited", num_experts=8)


@pytest.mark.parametrize("make,seed", [(_sigmoid_bias_mlp_shared, 1), (_group_limited, 3)])
def test_pruned_logits_equal_a_model_rebuilt_by_hand(make, seed):
  cfg = make()
  e = cfg.moe.num_experts
  v = _perturbed(cfg)
  out = prune(cfg, v, "random", 0.5, seed=seed)
  assert out.removed_NxR.shape == (2, e // 2)
  assert out.removed_NxR[0].tolist() != out.removed_NxR[1].tolist()  # different per layer
  assert out.cfg.moe.num_experts == e // 2 and cfg.moe.num_experts == e
  if cfg.moe.router == "group_limited":  # as many from each group: groups stay contiguous
    np.testing.assert_array_equal((out.removed_NxR // (e // 2)).sum(1), [e // 4, e // 4])
  want, _ = lm.apply(delete_by_hand(v, out.removed_NxR), _ids(), _with_experts(cfg, e // 2))
  got, _ = lm.apply(out.variables, _ids(), out.cfg)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(out.kept_NxK, [[j for j in range(e) if j not in r]
                                               for r in out.removed_NxR])


@pytest.fixture(scope="module")
def wide():
  """E=8, k=2 top-k."""
  cfg = tiny_config(num_experts=8)
  return Model(cfg, lm.init(jax.random.key(4), cfg))


def test_removing_experts_without_gate_weight_keeps_the_output(wide):
  """One token repeated: every position routes to the same two experts per layer, so the
  other six get no gate weight; removing four of them leaves that data's logits unchanged."""
  ids = np.full((8, 16), 65, np.int32)
  cal = calibrate(wide, ids)
  zero = [set(np.flatnonzero(g == 0)) for g in cal.gate_NxE]
  assert [len(z) for z in zero] == [6, 6]  # the precondition of the property
  out = prune(wide.cfg, wide.variables, "gate_weight", 0.5, cal)
  assert all(set(r) <= z for r, z in zip(out.removed_NxR, zero))
  want, _ = lm.apply(wide.variables, ids, wide.cfg)
  got, _ = lm.apply(out.variables, ids, out.cfg)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Sanity: removing a used expert changes it.
  used = prune(wide.cfg, wide.variables, "frequency", 0.5,
               Calibration(**{**cal.__dict__, "counts_NxE": -cal.counts_NxE}))
  changed, _ = lm.apply(used.variables, ids, used.cfg)
  assert np.abs(np.asarray(changed) - np.asarray(want)).max() > 1e-3


def test_removing_never_selected_experts_keeps_the_output_sigmoid_bias():
  cfg = _sigmoid_bias_mlp_shared()
  v = lm.init(jax.random.key(1), cfg)
  bias = np.zeros((2, 4), np.float32)
  bias[0, [1, 3]] = bias[1, [0, 2]] = -10.0  # below any sigmoid score: never selected
  v = {**v, "moe_state": {"moe_layers": {"block0": {"moe": {"router": {"bias": bias}}}}}}
  model = Model(cfg, v)
  cal = calibrate(model, "val", num_batches=1)
  np.testing.assert_array_equal(cal.counts_NxE[[0, 0, 1, 1], [1, 3, 0, 2]], 0)
  out = prune(cfg, v, "frequency", 0.5, cal)
  np.testing.assert_array_equal(out.removed_NxR, [[1, 3], [0, 2]])
  want, _ = lm.apply(v, cal.token_ids_BxL, cfg)
  got, _ = lm.apply(out.variables, cal.token_ids_BxL, out.cfg)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_array_equal(_node(out.variables["moe_state"])["router"]["bias"], 0.0)
  # The greedy (the layer module run with the router state) finds them too: removing
  # them leaves the layer output as it was.
  greedy = prune(cfg, v, "output_error", 0.5, cal)
  np.testing.assert_array_equal(greedy.removed_NxR, [[1, 3], [0, 2]])
  np.testing.assert_allclose(greedy.errors_NxR, 0.0, atol=1e-9)


@pytest.mark.parametrize("criterion,remove", [("frequency", 0.75), ("gate_weight", 0.5)])
def test_frequency_and_gate_weight_pick_what_numpy_picks_from_capture(wide, criterion, remove):
  ids = _ids(16, seed=7)
  r = capture(wide, ids)
  sel = r.selected_NxBxLxE.reshape(2, -1, 8)
  w = r.weights_NxBxLxE.reshape(2, -1, 8).astype(np.float64)
  counts, gate = sel.sum(1), w.sum(1)
  # frequency: fewest tokens, then least gate weight, then lowest index; gate_weight: the
  # other way round.
  score, tie = (counts, gate) if criterion == "frequency" else (gate, counts)
  k = round(remove * 8)
  want = [sorted(sorted(range(8), key=lambda j: (s[j], t[j], j))[:k]) for s, t in zip(score, tie)]
  out = prune(wide.cfg, wide.variables, criterion, remove, calibrate(wide, ids))
  np.testing.assert_array_equal(out.removed_NxR, want)
  np.testing.assert_allclose(out.scores_NxE, score, rtol=1e-5)


def test_output_error_greedy_equals_a_numpy_brute_force(wide):
  """Every greedy step tries every remaining expert with a NumPy float64 MoE layer routed
  over the kept experts only and drops the one of least mean squared output error."""
  cal = calibrate(wide, "val", num_batches=1, max_tokens=48, seed=1)
  out = prune(wide.cfg, wide.variables, "output_error", 0.25, cal)
  p = ref.moe_params(wide.variables)
  for i in range(2):
    x = cal.inputs_NxSxD[i].astype(np.float64)
    wg, experts = p["router"]["w_gate"][i], {k: v[i] for k, v in p["experts"].items()}
    full = ref.topk_swiglu_layer(x, wg, experts, 2)
    kept, order, errors = list(range(8)), [], []
    for _ in range(2):
      err = [np.mean(np.sum((ref.topk_swiglu_layer(x, wg, experts, 2,
                                                   [j for j in kept if j != c]) - full) ** 2,
                            axis=-1)) for c in kept]
      first, second = sorted(err)[:2]
      assert second - first > 1e-3 * first  # no near-tie: the choice is well defined
      best = int(np.argmin(err))
      order.append(kept.pop(best))
      errors.append(err[best])
    assert out.order_NxR[i].tolist() == order
    np.testing.assert_allclose(out.errors_NxR[i], errors, rtol=1e-3)
    assert out.removed_NxR[i].tolist() == sorted(order)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data(), n=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]),
       size=st.integers(1, 4))
def test_lowest_equals_a_brute_force_per_group(data, n, groups, size):
  e = groups * size
  per = data.draw(st.integers(0, size))
  ints = st.lists(st.integers(0, 3), min_size=n * e, max_size=n * e)
  score = np.asarray(data.draw(ints), np.float64).reshape(n, e)  # small integers: many ties
  tie = np.asarray(data.draw(ints), np.float64).reshape(n, e)
  got = lowest(score, per * groups, groups, tie)
  for s, t, row in zip(score, tie, got):
    want = []
    for g in range(groups):
      members = range(g * size, (g + 1) * size)
      want += sorted(members, key=lambda j: (s[j], t[j], j))[:per]
    assert row.tolist() == sorted(want)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data(), family=st.sampled_from(["swiglu", "mlp"]), p=st.integers(1, 3),
       e=st.integers(2, 6))
def test_keep_experts_equals_numpy_take(data, family, p, e):
  cfg = tiny_config(num_experts=e, expert=family)
  cfg.moe.mlp.bias = True
  d, f = 3, 2
  rng = np.random.default_rng(p * 10 + e)
  shapes = ({"w_gate": (e, d, f), "w_up": (e, d, f), "w_down": (e, f, d)} if family == "swiglu"
            else {"w_in": (e, d, f), "b_in": (e, f), "w_out": (e, f, d), "b_out": (e, d)})
  experts = {k: rng.standard_normal((p,) + s).astype(np.float32) for k, s in shapes.items()}
  router = {k: rng.standard_normal((p, d, e)).astype(np.float32) for k in ("w_gate", "w_noise")}
  bias = rng.standard_normal((p, e)).astype(np.float32)
  shared = {"w": rng.standard_normal((p, d)).astype(np.float32)}
  variables = {"params": {"embed": np.ones(2), "moe_layers": {"block0": {"moe": {
      "router": router, "experts": experts, "shared": shared}}}},
      "moe_state": {"moe_layers": {"block0": {"moe": {"router": {"bias": bias}}}}}}
  k = data.draw(st.integers(1, e))
  keep = np.asarray([sorted(data.draw(st.permutations(range(e)))[:k]) for _ in range(p)])
  out = _np(keep_experts(cfg, variables, keep))
  moe = _node(out["params"])
  for name, v in experts.items():
    np.testing.assert_array_equal(moe["experts"][name],
                                  np.stack([v[i][keep[i]] for i in range(p)]))
  for name, v in router.items():
    np.testing.assert_array_equal(moe["router"][name],
                                  np.stack([v[i][:, keep[i]] for i in range(p)]))
  np.testing.assert_array_equal(_node(out["moe_state"])["router"]["bias"],
                                np.stack([bias[i][keep[i]] for i in range(p)]))
  np.testing.assert_array_equal(moe["shared"]["w"], shared["w"])


def _cfg(**over):
  c = tiny_config(**{k: v for k, v in over.items() if "." not in k})
  for key, value in over.items():
    if "." in key:
      group, name = key.split(".")
      c.moe[group][name] = value
  return c


@pytest.mark.parametrize("cfg,criterion,remove,match", [
    (_cfg(), "random", 0.0, r"remove=0.0 is invalid: .* in \(0, 1\)"),
    (_cfg(), "random", 1.0, r"remove=1.0 is invalid"),
    (_cfg(), "random", 1.5, r"remove=1.5 is invalid"),
    (_cfg(), "random", -0.2, r"remove=-0.2 is invalid"),
    (_cfg(), "random", True, r"remove=True is invalid"),
    (_cfg(), "random", 0.1, "removes no expert of moe.num_experts=4"),
    (_cfg(), "random", 0.9, "removes all 4 experts"),
    (_cfg(), "random", 0.75, "leaves 1 experts per layer, fewer than moe.top_k=2"),
    (_cfg(), "magnitude", 0.5, r"criterion='magnitude'; allowed: \['frequency'"),
    (_cfg(router="soft"), "random", 0.5, "moe.router='soft': pruning has no meaning.*Soft MoE"),
    (_cfg(router="expert_choice"), "random", 0.5,
     "moe.router='expert_choice': pruning has no meaning.*experts choose their tokens"),
    (_cfg(router="hash"), "random", 0.5, r"moe.router='hash' cannot be pruned; allowed: \["),
    (_cfg(enabled=False), "random", 0.5, "not an MoE"),
    (_cfg(**{"topk.copies": 2}), "random", 0.5, "moe.topk.copies=2"),
    (_cfg(**{"adapters.enabled": True}), "random", 0.5, "moe.adapters.enabled=True"),
    (_cfg(router="group_limited"), "random", 0.25,
     "removes 1 of 4 .* moe.group_limited.num_groups=2 .* multiple of 2"),
    (_cfg(router="group_limited"), "output_error", 0.5,
     "criterion='output_error' with moe.group_limited.num_groups=2"),
    (_cfg(router="group_limited"), "random", 0.5,
     "moe.num_experts=2 gives an invalid config: .*moe.group_limited.top_groups"),
    (_cfg(), "frequency", 0.5, "criterion='frequency' needs calibration"),
    (_cfg(), "random", 0.5, "seed=-1"),
])
def test_errors_name_the_option(cfg, criterion, remove, match):
  with pytest.raises(ValueError, match=match):
    prune(cfg, {}, criterion, remove, seed=-1 if match == "seed=-1" else 0)


def test_a_calibration_of_another_model_is_refused():
  cal = Calibration(layers=[0, 1], router="topk", num_experts=8, top_k=2, data="ids",
                    token_ids_BxL=np.zeros((1, 16), np.int32), mask_BxL=np.ones((1, 16), bool),
                    counts_NxE=np.zeros((2, 8), np.int64), gate_NxE=np.zeros((2, 8)),
                    inputs_NxSxD=np.zeros((2, 1, 32), np.float32),
                    input_index_S=np.zeros(1, np.int64))
  with pytest.raises(ValueError, match="calibration is of 8 experts in layers"):
    prune(tiny_config(), {}, "gate_weight", 0.5, cal)
