"""moejax.inference.offload: hand-worked replays, closed forms, Belady's optimality, prefetch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.inference import offload
from moejax.inference import trace as trace_lib

DEMAND = ("lru", "lfu", "score_ema", "belady")


def _stream(experts, **kw) -> trace_lib.Trace:
  """A one-layer trace, one expert per token, of the expert ids in `experts`."""
  return trace_lib.make_trace(np.asarray(experts)[:, None, None], **kw)


def _hits(trace, cache, policy, **kw) -> int:
  row = offload.simulate(trace, cache, policy, **kw)
  return row["requests"] - row["misses"]


# Requests 0 1 0 2 1 0 3 0 1 through a cache of 2 experts (m: miss, h: hit; the cache after):
# lru:    0m{0} 1m{0,1} 0h 2m(evict 1){0,2} 1m(evict 0){2,1} 0m(evict 2){1,0}
#         3m(evict 1){0,3} 0h 1m                                             -> 2 hits
# lfu:    counts 0:2 1:1 at t3, 2m evicts 1; t4 counts 0:2 2:1, 1m evicts 2; 0h (0:3);
#         t6 counts 0:3 1:2, 3m evicts 1; 0h; 1m                             -> 3 hits
# belady: t3 2m: next use of 0 at t5, of 1 at t4, evict 0; 1h; t5 0m: 2 never again,
#         evict 2; t6 3m: 0 at t7, 1 at t8, evict 1; 0h; 1m                   -> 3 hits
# score_ema, decay 0.5 (s <- s/2 + w/2, w = 1): t3 s0 = .3125 > s1 = .125, evict 1;
#         t4 s0 = .156 < s2 = .25, evict 0; t5 s2 = .125 < s1 = .281, evict 2;
#         t6 s1 = .141 < s0 = .289, evict 1; 0h; 1m                          -> 2 hits
# score_ema, decay 0.9 (s <- .9 s + .1 w): t3 s0 = .163 > s1 = .081, evict 1;
#         t4 s0 = .147 > s2 = .09, evict 2; t5 0h; t6 s0 = .209 > s1 = .140,
#         evict 1; 0h; 1m                                                    -> 3 hits
REQUESTS = [0, 1, 0, 2, 1, 0, 3, 0, 1]


@pytest.mark.parametrize("policy,kw,hits", [
    ("lru", {}, 2), ("lfu", {}, 3), ("belady", {}, 3),
    ("score_ema", {"decay": 0.5}, 2), ("score_ema", {"decay": 0.9}, 3)])
def test_hand_worked_requests_give_the_exact_hit_counts(policy, kw, hits):
  t = _stream(REQUESTS, num_experts=4)
  for scope in ("layer", "global"):  # one layer: both scopes are one cache of 2
    row = offload.simulate(t, 2, policy, scope=scope, **kw)
    assert (row["requests"], row["requests"] - row["misses"]) == (9, hits)
    assert row["hit_rate"] == hits / 9


def test_experts_the_token_needs_in_the_layer_are_not_evicted_for_each_other():
  # Token 0 uses {0, 1}; token 1 uses 2 (higher weight, requested first) then 0. LRU's
  # victim for 2 would be 0 (requested before 1), but token 1 needs 0: 1 goes, 0 hits.
  ex = np.array([[[0, 1]], [[2, 0]]])
  w = np.array([[[0.5, 0.5]], [[0.7, 0.3]]])
  row = offload.simulate(trace_lib.make_trace(ex, w, num_experts=3), 2, "lru")
  assert (row["requests"], row["misses"]) == (4, 3)


def test_global_scope_is_one_cache_over_the_layers():
  # Layer 0 always uses expert 0 and layer 1 expert 1: a cache of 1 per layer misses only
  # on first use; one global cache of 1 alternates between (0, 0) and (1, 1).
  t = trace_lib.make_trace(np.tile(np.array([[[0], [1]]]), (5, 1, 1)), num_experts=2)
  assert offload.simulate(t, 1, "lru", scope="layer")["misses"] == 2
  assert offload.simulate(t, 1, "lru", scope="global")["misses"] == 10
  assert offload.simulate(t, 2, "lru", scope="global")["misses"] == 2


@pytest.mark.parametrize("policy", ["lru", "lfu", "score_ema"])
def test_uniform_iid_hit_rate_is_cache_over_experts(policy):
  # An online policy's cache does not depend on the next i.i.d. uniform request, so each
  # request after the first C hits with probability C / E exactly.
  e, tokens = 8, 20_000
  t = _stream(np.random.default_rng(0).integers(0, e, tokens), num_experts=e)
  for cache in (2, 5):
    rate = offload.simulate(t, cache, policy)["hit_rate"]
    assert abs(rate - cache / e) < 0.02  # binomial sd <= 0.0035


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("policy", DEMAND)
def test_cache_of_every_expert_misses_only_on_first_use(policy, scope):
  rng = np.random.default_rng(1)
  ex = np.stack([rng.permutation(6)[:2] for _ in range(3 * 40)]).reshape(40, 3, 2)
  t = trace_lib.make_trace(ex, num_experts=6)
  row = offload.simulate(t, 6 if scope == "layer" else 18, policy, scope=scope)
  distinct = len({(i, e) for i in range(3) for e in ex[:, i].ravel()})
  assert row["misses"] == distinct
  assert row["hit_rate"] == pytest.approx(1 - distinct / ex.size)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.integers(1, 2), st.integers(1, 40),
       st.sampled_from(["layer", "global"]), st.data())
def test_belady_hits_at_least_every_demand_policy(n, e, k, tokens, scope, data):
  k = min(k, e)
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  ex = np.stack([rng.permutation(e)[:k] for _ in range(tokens * n)]).reshape(tokens, n, k)
  drop = rng.random((tokens, n, k)) < 0.2  # some tokens use fewer experts
  drop[..., 0] = False
  ex[drop] = -1
  w = np.where(ex >= 0, rng.random((tokens, n, k)), 0.0)
  tr = trace_lib.make_trace(ex, w, num_experts=e)
  lo, hi = offload.cache_limits(tr, scope)
  cache = data.draw(st.integers(lo, hi))
  best = _hits(tr, cache, "belady", scope=scope)
  for policy in ("lru", "lfu", "score_ema"):
    assert best >= _hits(tr, cache, policy, scope=scope, decay=0.7)


def test_prefetch_by_hand_hits_loads_and_overlapped_latency():
  # Two layers, E = 2, one expert per layer per cache; layer 1 uses the other expert.
  # Plain LRU misses all 8 requests. A perfect prefetch loads layer 1's expert during
  # layer 0 (4 prefetch loads), so layer 1 always hits: 4 hits, 4 demand misses.
  ex = np.array([0, 1, 0, 1])[:, None]
  t = trace_lib.make_trace(np.stack([ex, 1 - ex], 1), num_experts=2, d_model=1000,
                           expert_hidden=2000)
  hw = offload.Hardware(tflops=100.0, bandwidth_gbps=10.0, dtype_bytes=2)
  assert offload.simulate(t, 1, "lru", hw=hw)["misses"] == 8
  row = offload.simulate(t, 1, "lru+prefetch_affinity", predicted_TxMxP=1 - ex[:, :, None],
                         hw=hw)
  assert (row["misses"], row["prefetch_loads"], row["hit_rate"]) == (4, 4, 0.5)
  assert row["prefetch_accuracy"] == row["prefetch_recall"] == 1.0
  bpe = 3 * 1000 * 2000 * 2
  assert row["bytes_moved"] == 8 * bpe
  compute, load = 2 * 3 * 1000 * 2000 / 100e12, bpe / 10e9
  # Layer 0: max(compute, one prefetch) + one demand miss; layer 1: compute.
  assert row["latency_ms_per_token"] == pytest.approx(1e3 * (max(compute, load) + load + compute))
  # Predicting layer 0's expert instead, never used: only token 0's prefetch loads; later
  # the prediction is the previous token's layer-1 expert, still resident.
  wrong = offload.simulate(t, 1, "lru+prefetch_affinity", predicted_TxMxP=ex[:, :, None], hw=hw)
  assert (wrong["misses"], wrong["prefetch_loads"]) == (8, 1)
  assert wrong["prefetch_accuracy"] == wrong["prefetch_recall"] == 0.0


def _chain_trace(seqs=24, length=20, e=8, n=3, seed=0) -> tuple[trace_lib.Trace, np.ndarray]:
  """Layer n + 1's expert = perm[layer n's expert]: perfectly predictable."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(e)
  ex = np.zeros((seqs * length, n, 1), np.int64)
  ex[:, 0, 0] = rng.integers(0, e, seqs * length)
  for i in range(1, n):
    ex[:, i, 0] = perm[ex[:, i - 1, 0]]
  return trace_lib.make_trace(ex, sequence_T=np.arange(seqs * length) // length,
                              num_experts=e), perm


def test_affinity_and_predictor_prefetch_a_permutation_chain():
  t, perm = _chain_trace()
  np.testing.assert_allclose(offload.fit_affinity(t)[0], np.eye(8)[perm])
  rows = {r["policy"]: r for r in offload.evaluate(
      t, [2], ["lru", "lru+prefetch_affinity", "lru+prefetch_predictor"])}
  # Every layer replays layer 0's requests relabelled, so plain LRU misses the same in each
  # layer; with perfect prefetch layers 1 and 2 always hit.
  lru = rows["lru"]
  assert lru["misses"] % 3 == 0 and lru["prefetch_accuracy"] is None
  for name in ("lru+prefetch_affinity", "lru+prefetch_predictor"):
    r = rows[name]
    assert r["prefetch_accuracy"] == r["prefetch_recall"] == 1.0
    assert r["misses"] == lru["misses"] // 3
    assert r["hit_rate"] > lru["hit_rate"] + 0.3
  # One global cache of 6: prefetching never evicts the layer's experts in use.
  glob = {r["policy"]: r for r in offload.evaluate(
      t, [6], ["lru", "lru+prefetch_affinity"], scope="global")}
  assert glob["lru+prefetch_affinity"]["prefetch_accuracy"] == 1.0
  assert glob["lru+prefetch_affinity"]["hit_rate"] > glob["lru"]["hit_rate"]


def test_predictor_reads_router_probabilities_when_stored():
  t, _ = _chain_trace(seqs=10)
  rng = np.random.default_rng(0)
  probs = rng.random((t.num_tokens, 3, 8)) * 0.2  # the chosen expert's probability is highest
  np.put_along_axis(probs, t.experts_TxNxK, 1.0, axis=-1)
  probs /= probs.sum(-1, keepdims=True)
  tp = trace_lib.make_trace(t.experts_TxNxK, num_experts=8, sequence_T=t.sequence_T,
                            probs_TxNxE=probs)
  fit, held = tp.split(0.5)
  params = offload.fit_predictor(fit, seed=3)
  assert params[0][0].shape == (8, 8)
  pred = offload.predict_predictor(params, held, 1)
  assert (pred[..., 0] == held.experts_TxNxK[:, 1:, 0]).mean() >= 0.95
  # Seeded: the same fit twice gives the same weights.
  np.testing.assert_array_equal(offload.fit_predictor(fit, seed=3)[1][0], params[1][0])


def test_softmax_regression_descends_to_the_targets():
  x = np.eye(4, dtype=np.float32)[np.arange(200) % 4]
  y = np.eye(3, dtype=np.float32)[np.arange(200) % 4 % 3]
  w, b = offload.fit_softmax_regression(x, y, steps=400)
  assert ((x @ w + b).argmax(-1) == np.arange(200) % 4 % 3).all()
  with pytest.raises(ValueError, match=r"steps=0; allowed: a positive integer"):
    offload.fit_softmax_regression(x, y, steps=0)


def test_bytes_moved_is_loads_times_bytes_per_expert():
  t, _ = _chain_trace(seqs=4)
  bpe = trace_lib.bytes_per_expert(t.model, 2)
  assert bpe == 3 * 64 * 128 * 2
  for policy in DEMAND:
    row = offload.simulate(t, 2, policy)
    assert row["bytes_moved"] == row["misses"] * bpe
  row = offload.simulate(t, 2, "lru", hw=offload.Hardware(dtype_bytes=4))
  assert row["bytes_moved"] == row["misses"] * 2 * bpe
  pred = offload.predict_affinity(offload.fit_affinity(t), t, 2)
  row = offload.simulate(t, 3, "lru+prefetch_affinity", predicted_TxMxP=pred)
  assert row["prefetch_loads"] > 0
  assert row["bytes_moved"] == (row["misses"] + row["prefetch_loads"]) * bpe


def test_latency_is_compute_plus_demand_stall_without_prefetch():
  t = _stream([0, 1, 0], num_experts=2, d_model=1000, expert_hidden=2000)
  hw = offload.Hardware(tflops=100.0, bandwidth_gbps=10.0, dtype_bytes=2)
  row = offload.simulate(t, 1, "lru", hw=hw)  # 3 misses
  compute, load = 2 * 3 * 1000 * 2000 / 100e12, 3 * 1000 * 2000 * 2 / 10e9
  assert row["latency_ms_per_token"] == pytest.approx(1e3 * (compute + load))
  assert row["compute_ms_per_token"] == pytest.approx(1e3 * compute)
  h = offload.hardware("h100", bandwidth_gbps=50)
  assert (h.tflops, h.bandwidth_gbps, h.dtype_bytes) == (989.0, 50.0, 2)
  assert offload.hardware().bandwidth_gbps == offload.PCIE4_X16_GBPS == 25.0
  assert offload.hardware("a100", tflops=1.5).tflops == 1.5


def test_bad_arguments_name_the_argument(tmp_path):
  t = _stream(REQUESTS, num_experts=4)
  with pytest.raises(ValueError, match=r"cache_size=0; allowed with scope='layer': an "
                     r"integer in \[1, 4\]"):
    offload.simulate(t, 0, "lru")
  with pytest.raises(ValueError, match=r"cache_size=5; allowed"):
    offload.simulate(t, 5, "lru")
  two = trace_lib.make_trace(np.zeros((4, 2, 2), np.int64) + [0, 1], num_experts=3,
                             sequence_T=[0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"cache_size=7; allowed with scope='global': an "
                     r"integer in \[2, 6\]"):
    offload.evaluate(two, [7], ["lru"], scope="global")
  with pytest.raises(ValueError, match=r"policy='fifo' is not a policy; allowed: lru, lfu"):
    offload.simulate(t, 2, "fifo")
  with pytest.raises(ValueError, match=r"policy='lfu\+prefetch_affinity' is not a policy"):
    offload.evaluate(two, [2], ["lfu+prefetch_affinity"])
  with pytest.raises(ValueError, match=r"gpu='tpu' is not a listed GPU; allowed: rtx4090, "
                     r"a100, h100"):
    offload.hardware("tpu")
  with pytest.raises(ValueError, match=r"bandwidth_gbps=0; allowed: a positive number"):
    offload.hardware(bandwidth_gbps=0)
  with pytest.raises(ValueError, match=r"scope='node'; allowed: layer, global"):
    offload.simulate(t, 2, "lru", scope="node")
  with pytest.raises(ValueError, match=r"decay=1.0; allowed"):
    offload.simulate(t, 2, "score_ema", decay=1.0)
  with pytest.raises(ValueError, match=r"give predicted_TxMxP"):
    offload.simulate(t, 2, "lru+prefetch_affinity")
  for bad in (0, 1, 1.5, -0.1):
    with pytest.raises(ValueError, match=rf"train_fraction={bad!r}; allowed: a number in "
                       r"\(0, 1\)"):
      offload.evaluate(two, [2], ["lru"], train_fraction=bad)
  with pytest.raises(ValueError, match=r"prefetch_k=4; allowed: an integer in \[1, 3\]"):
    offload.evaluate(two, [2], ["lru+prefetch_affinity"], prefetch_k=4)
  with pytest.raises(ValueError, match=r"the trace has one MoE layer"):
    offload.evaluate(_stream([0, 1], sequence_T=[0, 1]), [1], ["lru+prefetch_predictor"])
  with pytest.raises(ValueError, match=r"trace file .*none.npz' does not exist"):
    trace_lib.load(tmp_path / "none.npz")
  bare = trace_lib.make_trace(np.zeros((2, 1, 1), np.int64), model={"num_experts": 1})
  with pytest.raises(ValueError, match=r"trace: the model fingerprint lacks \['d_model', "
                     r"'expert_hidden'\]"):
    offload.simulate(bare, 1, "lru")
