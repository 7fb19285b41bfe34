"""moejax.inference.placement: round robin by hand, co-activated pairs, validity, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.inference import placement as pl
from moejax.inference import trace as trace_lib

# Two sequences (home devices 0 and 1 on D = 2), E = 4 experts, 2 per token, d_model = 64.
HAND = trace_lib.make_trace(np.array([[[0, 1]], [[0, 2]], [[1, 3]], [[2, 0]]]), num_experts=4,
                            sequence_T=[0, 0, 1, 1])


def test_round_robin_numbers_by_hand():
  p = pl.place(HAND, "round_robin", 2)
  np.testing.assert_array_equal(p.hosts_NxExD[0], [[1, 0], [0, 1], [1, 0], [0, 1]])
  assert p.capacity == 2
  row = pl.evaluate_placement(p, HAND)
  # Devices of the tokens' experts (home): {0, 1} (0), {0, 0} (0), {1, 1} (1), {0, 0} (1).
  # Assignments off home: 1, 0, 0, 2 -> 0.75 per token * 64 values * 2 bytes * 2 = 192.
  # Devices touched: 2, 1, 1, 1 -> 1.25. Load: device 0 runs 5 assignments, device 1 runs
  # 3; mean 4 -> imbalance 5 / 4.
  assert row["a2a_bytes_per_token_layer"] == row["a2a_bytes_per_token"] == 192.0
  assert row["devices_per_token"] == 1.25
  assert row["load_imbalance"] == 1.25
  # One copy per remote device: remote devices 1, 0, 0, 1 -> 0.5 * 256 = 128.
  assert row["a2a_dedup_bytes_per_token_layer"] == 128.0
  assert (row["method"], row["devices"], row["replicas"], row["note"]) == (
      "round_robin", 2, 0, "")
  assert pl.evaluate_placement(p, HAND, dtype_bytes=4)["a2a_bytes_per_token"] == 384.0
  two = trace_lib.make_trace(np.concatenate([HAND.experts_TxNxK] * 2, 1), num_experts=4,
                             sequence_T=[0, 0, 1, 1])  # the same layer twice
  row2 = pl.evaluate_placement(pl.place(two, "round_robin", 2), two)
  assert (row2["a2a_bytes_per_token_layer"], row2["a2a_bytes_per_token"]) == (192.0, 384.0)


def _pairs_trace(seqs=16, length=16, seed=0) -> trace_lib.Trace:
  """Layer 0: tokens use a pair (2i, 2i + 1); layer 1: a pair (i, 7 - i) of 8 experts.
  Round robin over 4 devices splits every pair."""
  rng = np.random.default_rng(seed)
  t = seqs * length
  a, b = rng.integers(0, 4, t), rng.integers(0, 4, t)
  ex = np.stack([np.stack([2 * a, 2 * a + 1], -1), np.stack([b, 7 - b], -1)], 1)
  return trace_lib.make_trace(ex, num_experts=8, sequence_T=np.arange(t) // length)


@pytest.mark.parametrize("method", ["greedy", "milp"])
def test_coactivation_placements_keep_pairs_together(method):
  t = _pairs_trace()
  fit, _ = t.split(0.5)
  dev_NxE = pl.place(fit, method, 4).hosts_NxExD.argmax(-1)
  for i in range(4):
    assert dev_NxE[0, 2 * i] == dev_NxE[0, 2 * i + 1]
    assert dev_NxE[1, i] == dev_NxE[1, 7 - i]
  rows = {r["method"]: r for r in pl.evaluate(t, 4, ["round_robin", method])}
  assert rows["round_robin"]["devices_per_token"] == 2.0
  assert rows[method]["devices_per_token"] == 1.0
  # Counting one copy per remote device: a pair on one device is sent once, not twice.
  dedup = "a2a_dedup_bytes_per_token_layer"
  assert rows[method][dedup] < 0.6 * rows["round_robin"][dedup]
  # Per assignment the bytes are placement-free: with the pair together every remote pair
  # sends 2 assignments, which is what the rows report.
  _, held = t.split(0.5)
  dev = pl.route(pl.place(fit, method, 4), held, pl.home_devices(held, 4))
  remote = (dev != pl.home_devices(held, 4)[:, None, None]).sum() / (held.num_tokens * 2)
  assert rows[method]["a2a_bytes_per_token_layer"] == pytest.approx(remote * 64 * 2 * 2)
  assert rows[method][dedup] == pytest.approx(remote / 2 * 64 * 2 * 2)


def test_greedy_splits_a_group_that_fits_no_device():
  # Pairs (0, 1), (2, 3), (4, 5) on 2 devices of 3: two pairs stay whole, the third is split.
  a = np.random.default_rng(0).integers(0, 3, 60)
  t = trace_lib.make_trace(np.stack([2 * a, 2 * a + 1], -1)[:, None], num_experts=6)
  dev = pl.place(t, "greedy", 2).hosts_NxExD[0].argmax(-1)
  assert np.bincount(dev, minlength=2).tolist() == [3, 3]
  assert sum(dev[2 * i] == dev[2 * i + 1] for i in range(3)) == 2


def test_milp_notes_what_was_used():
  t = _pairs_trace(seqs=4)
  assert pl.place(t, "milp", 4).note == "milp (optimal): layers [0, 1]"
  p = pl.place(t, "milp", 4, milp_max_experts=4)
  assert p.note == "greedy (E=8 > milp_max_experts=4): layers [0, 1]"
  np.testing.assert_array_equal(p.hosts_NxExD, pl.place(t, "greedy", 4).hosts_NxExD)


@pytest.mark.parametrize("e,d,limit", [(8, 2, 10.0), (8, 4, 10.0), (16, 4, 0.05)])
def test_milp_is_never_worse_than_greedy(e, d, limit):
  # Solved, stopped by the time limit or fallen back, milp keeps at least the greedy's
  # co-activation inside devices (its objective).
  rng = np.random.default_rng(e + d)
  ex = np.stack([rng.permutation(e)[:3] for _ in range(60)]).reshape(60, 1, 3)
  t = trace_lib.make_trace(ex, num_experts=e, sequence_T=np.arange(60) // 6)
  c = pl.coactivation(t)[0]
  m = pl.place(t, "milp", d, milp_time_limit=limit).hosts_NxExD[0].argmax(-1)
  g = pl.place(t, "greedy", d).hosts_NxExD[0].argmax(-1)
  assert pl.intra_coactivation(c, m) >= pl.intra_coactivation(c, g)
  # By hand on HAND under round robin: the pairs sharing a device are (0, 2) (tokens 1
  # and 3) and (1, 3) (token 2).
  hand = pl.coactivation(HAND)[0]
  assert pl.intra_coactivation(hand, np.arange(4) % 2) == 3.0


def test_replicate_hot_copies_the_hot_expert_and_balances_load():
  rng = np.random.default_rng(0)
  n = 400
  ex = np.where(rng.random(n) < 0.7, 0, rng.integers(1, 4, n))[:, None, None]  # expert 0: 70%
  t = trace_lib.make_trace(ex, num_experts=4, sequence_T=np.arange(n) // 20)
  p = pl.place(t, "replicate_hot", 2, replicas=2)
  assert p.capacity == 3 and p.hosts_NxExD[0, 0].all()  # expert 0 on both devices
  assert p.hosts_NxExD.sum() == 4 + 2
  rows = {r["method"]: r for r in pl.evaluate(t, 2)}  # default replicas: D = 2
  assert list(rows) == list(pl.METHODS)
  assert rows["replicate_hot"]["replicas"] == 2 and rows["round_robin"]["replicas"] == 0
  assert rows["replicate_hot"]["load_imbalance"] < rows["round_robin"]["load_imbalance"]
  assert rows["replicate_hot"]["a2a_bytes_per_token"] < rows["round_robin"]["a2a_bytes_per_token"]
  # Without a copy on its home device a token takes the copy whose device has the least
  # load so far: alternating here.
  one = trace_lib.make_trace(np.zeros((3, 1, 1), np.int64), num_experts=2)
  h = pl.Placement("hand", np.array([[[True, True, False], [False, False, True]]]), 1)
  np.testing.assert_array_equal(pl.route(h, one, np.array([2, 2, 2]))[:, 0, 0], [0, 1, 0])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3), (8, 2), (8, 4)]), st.integers(0, 6),
       st.integers(1, 3), st.integers(0, 10_000))
def test_every_placement_is_valid_within_capacity(ed, r, k, seed):
  e, d = ed
  r = min(r, e * (d - 1))
  rng = np.random.default_rng(seed)
  ex = np.stack([rng.permutation(e)[:k] for _ in range(2 * 30)]).reshape(30, 2, k)
  t = trace_lib.make_trace(ex, num_experts=e, sequence_T=np.arange(30) // 5)
  for method in pl.METHODS:
    p = pl.place(t, method, d, replicas=r, milp_time_limit=1.0)
    pl.check_placement(p)
    copies_NxE = p.hosts_NxExD.sum(-1)
    assert p.hosts_NxExD.shape == (2, e, d)
    assert (p.hosts_NxExD.sum(1) <= p.capacity).all()
    if method == "replicate_hot":
      assert p.capacity == e // d + -(-r // d)
      assert (copies_NxE >= 1).all() and (copies_NxE.sum(-1) == e + r).all()
    else:
      assert p.capacity == e // d
      assert (copies_NxE == 1).all() and (p.hosts_NxExD.sum(1) == e // d).all()
    dev = pl.route(p, t, pl.home_devices(t, d))
    assert ((dev >= 0) & (dev < d)).all()
    assert p.hosts_NxExD[np.arange(2)[None, :, None], t.experts_TxNxK, dev].all()


def test_one_device_moves_nothing():
  rows = pl.evaluate(_pairs_trace(seqs=4), 1)
  assert [r["method"] for r in rows] == list(pl.METHODS)
  for row in rows:
    assert row["a2a_bytes_per_token"] == 0.0 and row["replicas"] == 0
    assert row["devices_per_token"] == 1.0 and row["load_imbalance"] == 1.0


def test_bad_arguments_name_the_argument():
  for method in pl.METHODS:
    for bad in (3, 5, 8):
      with pytest.raises(ValueError, match=rf"devices={bad}; allowed: a divisor of the 4 "
                         "experts per layer"):
        pl.place(HAND, method, bad)
    with pytest.raises(ValueError, match=r"devices=0; allowed: an integer >= 1"):
      pl.place(HAND, method, 0)
  with pytest.raises(ValueError, match=r"devices=3; allowed: a divisor"):
    pl.evaluate(HAND, 3)
  with pytest.raises(ValueError, match=r"replicas=5; allowed: at most 4 for 4 experts on 2 "
                     "devices"):
    pl.place(HAND, "replicate_hot", 2, replicas=5)
  with pytest.raises(ValueError, match=r"replicas=-1; allowed: an integer >= 0"):
    pl.evaluate(HAND, 2, replicas=-1)
  with pytest.raises(ValueError, match=r"method='spread'; allowed: round_robin, greedy"):
    pl.evaluate(HAND, 2, ["round_robin", "spread"])
  with pytest.raises(ValueError, match=r"train_fraction=1.0; allowed: a number in \(0, 1\)"):
    pl.evaluate(HAND, 2, train_fraction=1.0)
  with pytest.raises(ValueError, match=r"milp_time_limit=0; allowed: seconds > 0"):
    pl.place(HAND, "milp", 2, milp_time_limit=0)
  other = trace_lib.make_trace(np.zeros((2, 1, 1), np.int64), num_experts=8)
  with pytest.raises(ValueError, match=r"covers 1 layers x 4 experts; the trace has 1 x 8"):
    pl.evaluate_placement(pl.place(HAND, "round_robin", 2), other)
