"""Routing analyses on hand-built routings with known answers, slow references and
property-based cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from moejax.analysis import (adaptive, coactivation, load, locality, make_routing, saturation,
                             specialization)
from tests.analysis import reference


def _onehot(experts_NxBxL, e):
  return np.eye(e, dtype=bool)[np.asarray(experts_NxBxL)]


def _random_routing(rng, n=2, b=3, l=8, e=5, k=None, domains=3, masked=True):
  """Random selections (fixed k or adaptive 0..e), weights, ids, mask and domains."""
  if k is None:
    sel = rng.random((n, b, l, e)) < 0.4
  else:
    order = np.argsort(rng.random((n, b, l, e)), axis=-1)
    sel = np.zeros((n, b, l, e), bool)
    np.put_along_axis(sel, order[..., :k], True, axis=-1)
  w = np.where(sel, rng.random((n, b, l, e)), 0.0)
  mask = rng.random((b, l)) > 0.2 if masked else np.ones((b, l), bool)
  mask[0, 0] = True  # at least one token
  return make_routing(sel, w, token_ids_BxL=rng.integers(0, 7, (b, l)), mask_BxL=mask,
                      domain_B=rng.integers(0, domains, b),
                      domain_names=[f"d{i}" for i in range(domains)])


# ----------------------------------------------------------------------- known answers


def test_load_balanced_and_all_to_one():
  e = 4
  balanced = make_routing(_onehot(np.arange(8).reshape(1, 2, 4) % e, e))
  np.testing.assert_allclose(load.expert_load(balanced), [[0.25] * 4])
  imb = load.imbalance(load.expert_load(balanced))
  np.testing.assert_allclose(imb["cv"], [0.0])
  np.testing.assert_allclose(imb["max_over_mean"], [1.0])
  one = make_routing(_onehot(np.zeros((1, 2, 4), int), e))
  imb = load.imbalance(load.expert_load(one))
  np.testing.assert_allclose(imb["max_over_mean"], [4.0])  # E when all go to one expert
  np.testing.assert_allclose(imb["cv"], [np.sqrt(3.0)])  # std of (1,0,0,0)/mean
  with pytest.raises(ValueError, match="by='count'"):
    load.expert_load(one, by="count")


def test_coactivation_known_pairs():
  # Token 0 selects {0, 1}, token 1 {0, 1}, token 2 {2, 3}, token 3 {0, 2}.
  sel = np.zeros((1, 1, 4, 4), bool)
  for t, s in enumerate([(0, 1), (0, 1), (2, 3), (0, 2)]):
    sel[0, 0, t, list(s)] = True
  c = coactivation.coactivation(make_routing(sel))[0]
  assert c[0, 1] == c[1, 0] == 0.5 and c[2, 3] == 0.25 and c[0, 2] == 0.25 and c[1, 3] == 0
  np.testing.assert_allclose(np.diag(c), [0.75, 0.5, 0.5, 0.25])
  np.testing.assert_allclose(coactivation.conditional(c[None])[0, 1, 0], 1.0)  # P(0 | 1)
  # Pairs (0,1), (0,2), (2,3) of the 6 co-occur.
  np.testing.assert_allclose(coactivation.density(c[None]), [3 / 6])
  np.testing.assert_allclose(coactivation.density(c[None], min_share=0.3), [1 / 6])


def test_domain_only_to_expert0_has_ratio_one_over_share():
  # Domain A (sequence 0) sends every token to expert 0; domain B spreads over 0..3.
  e, l = 4, 8
  experts = np.stack([np.zeros(l, int), np.arange(l) % e])[None]
  r = make_routing(_onehot(experts, e), domain_B=np.array([0, 1]), domain_names=["A", "B"])
  dom = specialization.domain_specialization(r)
  share0 = (l + l / e) / (2 * l)  # expert 0's share of all selections
  np.testing.assert_allclose(dom["overall"][0, 0], share0)
  np.testing.assert_allclose(dom["ratio"][0, 0, 0], 1.0 / share0)
  np.testing.assert_allclose(dom["ratio"][0, 0, 1:], 0.0)
  np.testing.assert_allclose(dom["tokens"], [l, l])


def test_domain_needs_labels():
  with pytest.raises(ValueError, match="no domain labels"):
    specialization.domain_specialization(make_routing(np.ones((1, 1, 2, 2), bool)))


def test_token_specialisation_pure_and_mixed():
  # Ids 1 always -> expert 0, id 2 always -> expert 1: purity 1, each expert one id.
  ids = np.array([[1, 2, 1, 2]])
  r = make_routing(_onehot((ids - 1)[None], 2), token_ids_BxL=ids)
  spec = specialization.token_specialization(r)
  np.testing.assert_allclose(spec["purity"], [1.0])
  np.testing.assert_allclose(spec["concentration"], [[1.0, 1.0]])
  assert specialization.top_tokens(spec["counts"], 0, 1) == [(2, 1.0)]
  # Id 1 alternates between experts: purity 1/2; experts see the corpus mix.
  r = make_routing(_onehot(np.array([[[0, 1, 0, 1]]]), 2), token_ids_BxL=np.array([[1, 1, 2, 2]]))
  spec = specialization.token_specialization(r)
  np.testing.assert_allclose(spec["purity"], [0.5])
  np.testing.assert_allclose(spec["concentration"], [[0.0, 0.0]], atol=1e-12)


def test_identical_checkpoints_saturate_at_one():
  r = _random_routing(np.random.default_rng(0))
  np.testing.assert_allclose(saturation.saturation(r, r), [1.0, 1.0])


def test_saturation_half_overlap_and_errors():
  a = make_routing(_onehot(np.zeros((1, 1, 2), int), 4) | _onehot(np.ones((1, 1, 2), int), 4))
  b = make_routing(_onehot(np.zeros((1, 1, 2), int), 4) | _onehot(np.full((1, 1, 2), 2), 4))
  np.testing.assert_allclose(saturation.saturation(a, b), [0.5])  # top-2 share one expert
  c = make_routing(a.selected_NxBxLxE, token_ids_BxL=np.ones((1, 2), int))
  with pytest.raises(ValueError, match="different tokens"):
    saturation.saturation(a, c)


def test_srp_sch_on_a_constructed_segment():
  # One sequence, one segment of 4 tokens, E = 4, top-2 selections and weights:
  #   t0 {0: .6, 1: .4}  t1 {0: .7, 2: .3}  t2 {0: .5, 1: .5}  t3 {3: .8, 1: .2}
  # Weight totals per expert: [1.8, 1.1, 0.3, 0.8] of 4.0; counts: [3, 3, 1, 1] of 8.
  w = np.zeros((1, 1, 4, 4))
  for t, picks in enumerate([{0: .6, 1: .4}, {0: .7, 2: .3}, {0: .5, 1: .5}, {3: .8, 1: .2}]):
    for j, v in picks.items():
      w[0, 0, t, j] = v
  r = make_routing(w > 0, w)
  np.testing.assert_allclose(locality.srp(r, 4, 1), [1.8 / 4.0])
  np.testing.assert_allclose(locality.srp(r, 4, 2), [2.9 / 4.0])
  np.testing.assert_allclose(locality.sch(r, 4, 1), [3 / 8])
  np.testing.assert_allclose(locality.sch(r, 4, 2), [6 / 8])
  np.testing.assert_allclose(locality.sch(r, 4, 4), [1.0])
  # Segments of 2: (t0, t1) totals [1.3, .4, .3, 0], (t2, t3) [.5, .7, 0, .8].
  np.testing.assert_allclose(locality.srp(r, 2, 1), [(1.3 / 2 + 0.8 / 2) / 2])
  # Segments of 1 with m = k: every token's own experts -> 1.
  np.testing.assert_allclose(locality.sch(r, 1, 2), [1.0])
  g = locality.grid(r, [1, 2, 4], [1, 2])
  assert g["srp"].shape == g["sch"].shape == (1, 3, 2)
  np.testing.assert_allclose(g["srp"][0, 2, 1], 2.9 / 4.0)
  with pytest.raises(ValueError, match="segment_len=5"):
    locality.srp(r, 5, 1)
  with pytest.raises(ValueError, match="cache_size=0"):
    locality.sch(r, 2, 0)


def test_adaptive_by_position_and_frequency():
  # Position 0 always 1 expert, position 1 always 3; id 5 frequent (3x), id 9 rare (1x).
  sel = np.zeros((1, 2, 2, 4), bool)
  sel[0, :, 0, 0] = True
  sel[0, :, 1, :3] = True
  ids = np.array([[5, 5], [5, 9]])
  r = make_routing(sel, token_ids_BxL=ids)
  np.testing.assert_allclose(adaptive.by_position(r), [[1.0, 3.0]])
  edges, mean, cnt = adaptive.by_frequency(r, num_bins=2)
  assert cnt.tolist() == [1, 3]
  np.testing.assert_allclose(mean, [[3.0, (1 + 3 + 1) / 3]])
  with pytest.raises(ValueError, match="num_bins=0"):
    adaptive.by_frequency(r, num_bins=0)


def test_make_routing_validates_arguments():
  with pytest.raises(ValueError, match="selected_NxBxLxE must be 4-D"):
    make_routing(np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="mask_BxL has shape"):
    make_routing(np.ones((1, 2, 3, 4), bool), mask_BxL=np.ones((3, 3), bool))


# ----------------------------------------------------------------------- references


@pytest.mark.parametrize("k", [None, 2])
def test_against_slow_references(k):
  r = _random_routing(np.random.default_rng(3), k=k)
  np.testing.assert_allclose(load.expert_load(r), reference.load(r), rtol=1e-12)
  np.testing.assert_allclose(load.imbalance(load.expert_load(r))["cv"],
                             [reference.cv(x) for x in reference.load(r)], rtol=1e-9)
  np.testing.assert_allclose(coactivation.coactivation(r), reference.coactivation(r), rtol=1e-12)
  np.testing.assert_allclose(specialization.domain_specialization(r)["ratio"],
                             reference.domain_ratio(r), rtol=1e-9)
  np.testing.assert_allclose(specialization.token_specialization(r)["purity"],
                             reference.purity(r), rtol=1e-12)
  np.testing.assert_allclose(adaptive.by_position(r), reference.experts_by_position(r),
                             rtol=1e-12)
  other = _random_routing(np.random.default_rng(4), k=k)
  other.token_ids_BxL, other.mask_BxL = r.token_ids_BxL, r.mask_BxL
  np.testing.assert_allclose(saturation.saturation(r, other), reference.overlap_mean(r, other))
  for seg in (1, 3, 8):
    for m in (1, 2, 4):
      np.testing.assert_allclose(locality.srp(r, seg, m), reference.best_set_share(
          r.weights_NxBxLxE, r.mask_BxL, seg, m), rtol=1e-9)
      np.testing.assert_allclose(locality.sch(r, seg, m), reference.best_set_share(
          r.selected_NxBxLxE.astype(float), r.mask_BxL, seg, m), rtol=1e-9)


# ----------------------------------------------------------------------- properties


@seed(1234)
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 9),
       st.sampled_from([None, 1, 2]), st.booleans())
def test_properties(s, e, l, k, masked):
  """Bounds and invariants on random routings, including empty experts, all tokens
  to one expert (e = 1) and sequence lengths that no segment length divides."""
  k = None if k is None or k > e else k
  rng = np.random.default_rng(s)
  r = _random_routing(rng, n=2, b=2, l=l, e=e, k=k, masked=masked)
  ld = load.expert_load(r)
  assert np.all(ld >= 0) and np.all(np.isclose(ld.sum(-1), 1.0) | (ld.sum(-1) == 0))
  assert np.all(load.imbalance(ld)["max_over_mean"] <= e + 1e-9)
  co = coactivation.coactivation(r)
  np.testing.assert_allclose(co, np.swapaxes(co, 1, 2))
  assert np.all(co <= np.diagonal(co, axis1=1, axis2=2)[:, :, None] + 1e-12)
  d = coactivation.density(co)
  assert np.all((0 <= d) & (d <= 1))
  np.testing.assert_allclose(saturation.saturation(r, r), 1.0)
  prev = None
  for m in range(1, e + 1):  # SRP/SCH grow with the cache and reach 1 at m = E
    for fn in (locality.srp, locality.sch):
      v = fn(r, l, m)
      assert np.all((v >= 0) & (v <= 1 + 1e-12))
    cur = locality.sch(r, max(1, l // 2), m)
    if prev is not None:
      assert np.all(cur >= prev - 1e-12)
    prev = cur
  live = r.tokens(r.selected_NxBxLxE).any(axis=(1, 2))
  np.testing.assert_allclose(locality.sch(r, 1, e)[live], 1.0)
  ratio = specialization.domain_specialization(r)
  # The overall-share-weighted sum of a domain's ratios is 1 (its shares sum to 1).
  w_NxD = (ratio["ratio"] * ratio["overall"][:, None, :]).sum(-1)
  has_D = ratio["share"].sum(-1) > 0
  np.testing.assert_allclose(w_NxD[has_D], 1.0)
  assert np.all(ratio["ratio"] >= 0)
