"""moejax.inference.trace: the compact file round-trips and agrees with analysis.routing."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import load_tool, tiny_config
from moejax import model as lm
from moejax.analysis import routing as routing_lib
from moejax.inference import trace as trace_lib

CFG = tiny_config()
MODEL = routing_lib.Model(CFG, lm.init(jax.random.key(0), CFG))
capture_tool = load_tool("capture_trace")


def _ids(b=3, l=16, seed=0):
  return np.random.default_rng(seed).integers(0, 258, (b, l)).astype(np.int32)


def test_capture_round_trips_through_the_file_and_back_to_routing(tmp_path):
  r = routing_lib.capture(MODEL, _ids())
  t = trace_lib.capture(MODEL, _ids())
  assert t.num_tokens == 3 * 16 and t.experts_TxNxK.shape[1:] == (2, 2)
  assert t.model == trace_lib.fingerprint(CFG)
  trace_lib.save(tmp_path / "t.npz", t)
  back = trace_lib.load(tmp_path / "t.npz")
  for f in ("experts_TxNxK", "weights_TxNxK", "token_ids_T", "positions_T", "sequence_T"):
    np.testing.assert_array_equal(getattr(back, f), getattr(t, f))
  np.testing.assert_allclose(back.probs_TxNxE, r.probs_NxBxLxC.transpose(1, 2, 0, 3).reshape(
      48, 2, -1), atol=1e-3)  # float16
  r2 = trace_lib.to_routing(back)
  np.testing.assert_array_equal(r2.selected_NxBxLxE, r.selected_NxBxLxE)
  np.testing.assert_allclose(r2.weights_NxBxLxE, r.weights_NxBxLxE, atol=1e-7)
  np.testing.assert_array_equal(r2.token_ids_BxL, r.token_ids_BxL)
  # Experts in each token's slots come by descending weight (a NumPy reference).
  w = r.weights_NxBxLxE[:, 0, 0]  # [N, E] of token 0
  np.testing.assert_array_equal(t.experts_TxNxK[0], np.argsort(-w, axis=-1)[:, :2])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(2, 6),
       st.integers(0, 10_000))
def test_dense_sparse_round_trip_on_random_routings(n, b, l, e, seed):
  rng = np.random.default_rng(seed)
  sel = rng.random((n, b, l, e)) < 0.4
  w = np.where(sel, rng.random((n, b, l, e)).astype(np.float32) + 0.01, 0.0)
  mask = rng.random((b, l)) < 0.8
  mask[0, 0] = True
  r = routing_lib.make_routing(sel, w, mask_BxL=mask)
  t = trace_lib.from_routing(r)
  bb, ll = np.nonzero(mask)  # row-major: the trace's token order
  assert t.num_tokens == bb.size
  np.testing.assert_array_equal(t.sequence_T, bb)
  np.testing.assert_array_equal(t.positions_T, ll)
  np.testing.assert_array_equal(t.selected(), sel[:, bb, ll].transpose(1, 0, 2))
  np.testing.assert_allclose(t.dense_weights(), w[:, bb, ll].transpose(1, 0, 2), atol=1e-7)
  assert (np.diff(t.weights_TxNxK, axis=-1) <= 0).all()  # descending within a token
  back = trace_lib.to_routing(t)  # sequences renumbered 0.. in order of appearance
  rows = np.searchsorted(np.unique(bb), bb)
  np.testing.assert_array_equal(back.selected_NxBxLxE[:, rows, ll], sel[:, bb, ll])
  np.testing.assert_array_equal(back.mask_BxL.sum(), bb.size)


def test_split_concat_and_model_check():
  t = trace_lib.capture(MODEL, _ids(b=4))
  a, b = t.split(0.5)
  assert set(a.sequence_T) == {0, 1} and set(b.sequence_T) == {2, 3}
  both = trace_lib.Trace.concat([a, b])
  assert both.num_tokens == t.num_tokens
  trace_lib.check_model(t, CFG, "--trace")
  other = tiny_config(num_experts=8)
  with pytest.raises(ValueError, match=r"--trace: the trace comes from a different model "
                     r"\(num_experts: trace 4, model 8\)"):
    trace_lib.check_model(t, other, "--trace")
  assert trace_lib.bytes_per_expert(CFG, 2) == 3 * 32 * 32 * 2


def test_bad_files_and_arrays_are_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    trace_lib.load(tmp_path / "none.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="is not a .npz trace"):
    trace_lib.load(tmp_path / "junk.npz")
  np.savez(tmp_path / "plain.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="has no metadata"):
    trace_lib.load(tmp_path / "plain.npz")
  t = trace_lib.capture(MODEL, _ids(b=1))
  with pytest.raises(ValueError, match=r"experts_TxNxK must lie in \[-1, 4\)"):
    trace_lib.Trace(t.experts_TxNxK + 4, t.weights_TxNxK, t.token_ids_T, t.positions_T,
                    t.sequence_T, t.layers, 4, t.model)


def test_capture_tool_writes_a_trace_of_the_runs_validation_split(tmp_path, capsys):
  from moejax.train.trainer import write_run  # noqa: PLC0415
  run = str(tmp_path / "run")
  write_run(CFG, MODEL.variables, run)
  out = tmp_path / "t.npz"
  assert capture_tool.main(["--run", run, "--out", str(out), "--batches", "1"]) == 0
  t = trace_lib.load(out)
  assert t.num_tokens == CFG.train.batch_size * CFG.train.seq_len
  trace_lib.check_model(t, CFG, "--trace")
  assert capture_tool.main(["--run", run, "--out", str(out), "--batches", "0"]) == 2
  assert "--batches 0 must be >= 1" in capsys.readouterr().err
