"""moejax.inference.trace: the compact file round-trips and agrees with analysis.routing."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import load_tool, tiny_config
from moejax import model as lm
from moejax.analysis import coactivation, load as load_lib
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
  np.testing.assert_array_equal(t.positions_T, np.tile(np.arange(16), 3))
  np.testing.assert_array_equal(t.sequence_T, np.repeat(np.arange(3), 16))
  trace_lib.save(tmp_path / "t.npz", t)
  back = trace_lib.load(tmp_path / "t.npz")
  for f in trace_lib.ARRAYS:
    assert getattr(back, f).dtype == trace_lib.DTYPES[f]
    np.testing.assert_array_equal(getattr(back, f), getattr(t, f))
  assert (back.layers, back.num_experts, back.model) == (t.layers, t.num_experts, t.model)
  assert back.probs_TxNxE.dtype == np.float16
  np.testing.assert_allclose(back.probs_TxNxE, r.probs_NxBxLxC.transpose(1, 2, 0, 3).reshape(
      48, 2, -1), atol=1e-3)  # float16
  r2 = trace_lib.to_routing(back)
  np.testing.assert_array_equal(r2.selected_NxBxLxE, r.selected_NxBxLxE)
  np.testing.assert_allclose(r2.weights_NxBxLxE, r.weights_NxBxLxE, atol=1e-7)
  np.testing.assert_array_equal(r2.token_ids_BxL, r.token_ids_BxL)
  assert (r2.layers, r2.top_k, r2.router) == (r.layers, r.top_k, r.router)
  # The analyses read the converted trace as the captured routing.
  np.testing.assert_allclose(coactivation.coactivation(r2), coactivation.coactivation(r))
  np.testing.assert_allclose(load_lib.expert_load(r2), load_lib.expert_load(r))
  # Experts in each token's slots come by descending weight (a NumPy reference).
  w = r.weights_NxBxLxE[:, 0, 0]  # [N, E] of token 0
  np.testing.assert_array_equal(t.experts_TxNxK[0], np.argsort(-w, axis=-1)[:, :2])


def test_masked_tokens_are_left_out():
  r = routing_lib.capture(MODEL, ["In the beginning", "God"])  # two short, padded rows
  t = trace_lib.from_routing(r, CFG)
  assert t.num_tokens == int(r.mask_BxL.sum()) == len("In the beginning") + 2 + len("God") + 2
  back = trace_lib.to_routing(t)
  np.testing.assert_array_equal(back.mask_BxL, r.mask_BxL)
  np.testing.assert_array_equal(back.selected_NxBxLxE[:, back.mask_BxL],
                                r.selected_NxBxLxE[:, r.mask_BxL])


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
  assert t.max_experts == max(1, int(sel[:, bb, ll].sum(-1).max()))
  np.testing.assert_array_equal(t.sequence_T, bb)
  np.testing.assert_array_equal(t.positions_T, ll)
  np.testing.assert_array_equal(t.selected(), sel[:, bb, ll].transpose(1, 0, 2))
  np.testing.assert_allclose(t.dense_weights(), w[:, bb, ll].transpose(1, 0, 2), atol=1e-7)
  assert (np.diff(t.weights_TxNxK, axis=-1) <= 0).all()  # descending within a token
  assert (t.weights_TxNxK[t.experts_TxNxK < 0] == 0).all()
  back = trace_lib.to_routing(t)  # sequences renumbered 0.. in ascending id
  rows = np.searchsorted(np.unique(bb), bb)
  np.testing.assert_array_equal(back.selected_NxBxLxE[:, rows, ll], sel[:, bb, ll])
  np.testing.assert_allclose(back.weights_NxBxLxE[:, rows, ll], w[:, bb, ll], atol=1e-7)
  assert back.mask_BxL.sum() == bb.size


def test_split_concat_and_model_check():
  t = trace_lib.capture(MODEL, _ids(b=4))
  a, b = t.split(0.5)
  assert set(a.sequence_T) == {0, 1} and set(b.sequence_T) == {2, 3}
  both = trace_lib.Trace.concat([a, b])
  assert both.num_tokens == t.num_tokens
  np.testing.assert_array_equal(both.experts_TxNxK, t.experts_TxNxK)
  again = trace_lib.Trace.concat([t, t])  # sequence ids stay distinct
  assert set(again.sequence_T) == set(range(8)) and again.probs_TxNxE.shape[0] == 128
  one = trace_lib.make_trace(np.zeros((2, 2, 1), np.int64), num_experts=4, model=t.model,
                             layers=t.layers)
  mixed = trace_lib.Trace.concat([one, t])  # K = 1 and 2: padded with empty slots
  assert mixed.max_experts == 2 and (mixed.experts_TxNxK[:2, :, 1] == -1).all()
  assert mixed.probs_TxNxE is None
  with pytest.raises(ValueError, match=r"traces\[1\] has model .*concat needs one model"):
    trace_lib.Trace.concat([t, trace_lib.make_trace(np.zeros((1, 2, 1), np.int64))])
  trace_lib.check_model(t, CFG, "--trace")
  other = tiny_config(num_experts=8)
  with pytest.raises(ValueError, match=r"--trace: the trace comes from a different model "
                     r"\(num_experts: trace 4, model 8\)"):
    trace_lib.check_model(t, other, "--trace")
  deeper = tiny_config()
  deeper.model.num_layers, deeper.model.d_model = 3, 64
  with pytest.raises(ValueError, match=r"trace_arg: .*\(num_layers: trace 2, model 3; "
                     r"d_model: trace 32, model 64\)"):
    trace_lib.check_model(t, deeper, "trace_arg")
  assert trace_lib.bytes_per_expert(CFG, 2) == 3 * 32 * 32 * 2
  assert trace_lib.bytes_per_expert(t.model, 4) == 3 * 32 * 32 * 4
  wide = tiny_config(expert_hidden=0)  # 0: the dense FFN width
  assert trace_lib.fingerprint(wide)["expert_hidden"] == 64


def test_bad_files_and_arrays_are_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    trace_lib.load(tmp_path / "none.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"trace file '.*junk.npz' is not a .npz trace"):
    trace_lib.load(tmp_path / "junk.npz")
  np.savez(tmp_path / "plain.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="has no metadata"):
    trace_lib.load(tmp_path / "plain.npz")
  t = trace_lib.capture(MODEL, _ids(b=1))
  trace_lib.save(tmp_path / "good.npz", t)
  good = dict(np.load(tmp_path / "good.npz"))

  def write(name, **change):
    arrays = {**good, **change}
    np.savez(tmp_path / name, **{k: v for k, v in arrays.items() if v is not None})
    return tmp_path / name

  meta = json.loads(str(good["meta"]))
  for path, message in [
      (write("nojson.npz", meta=np.asarray("{")), "its metadata is not JSON"),
      (write("fmt.npz", meta=np.asarray(json.dumps({**meta, "format": "x"}))),
       r"has format 'x'; allowed: 'moejax-trace-1'"),
      (write("noarr.npz", sequence_T=None), r"lacks \['sequence_T'\]"),
      (write("dtype.npz", experts_TxNxK=good["experts_TxNxK"].astype(np.int64)),
       r"experts_TxNxK is int64; allowed: int32"),
      (write("shape.npz", positions_T=good["positions_T"][:3]),
       r"positions_T has shape \(3,\); allowed: \(16,\)"),
      (write("range.npz", experts_TxNxK=good["experts_TxNxK"] + 4),
       r"experts_TxNxK must lie in \[-1, 4\)"),
  ]:
    with pytest.raises(ValueError, match=r"trace file '.*\.npz'.*" + message):
      trace_lib.load(path)
  with pytest.raises(ValueError, match=r"weights_TxNxK is non-zero on empty slots"):
    trace_lib.Trace(np.full((1, 1, 1), -1), np.ones((1, 1, 1)), [0], [0], [0], [0], 4, {})
  with pytest.raises(ValueError, match=r"experts_TxNxK is a float64 array of shape \(1, 1\)"):
    trace_lib.Trace(np.zeros((1, 1)), np.zeros((1, 1, 1)), [0], [0], [0], [0], 4, {})
  with pytest.raises(ValueError, match=r"layers lists 2 layers; the arrays hold 1"):
    trace_lib.Trace(np.zeros((1, 1, 1)).astype(int), np.ones((1, 1, 1)), [0], [0], [0],
                    [0, 1], 4, {})
  with pytest.raises(ValueError, match=r"fraction=1; allowed: a number in \(0, 1\)"):
    t.split(1)
  with pytest.raises(ValueError, match=r"holds 1 sequence\(s\); a split needs at least 2"):
    t.split(0.5)


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
