"""Calibration statistics equal NumPy float64 recomputations from the router's input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.analysis import Model, capture
from moejax.compress import calibrate
from moejax.compress.calibrate import calibration_rows, evenly_spaced
from tests.compress import reference as ref
from tests.conftest import tiny_config

TEXTS = ["In the beginning God created the heaven and the earth.", "Jesus wept.",
         "And the earth was without form, and void; and darkness was upon the face of the deep."]


@pytest.fixture(scope="module")
def model() -> Model:
  cfg = tiny_config()
  return Model(cfg, lm.init(jax.random.key(3), cfg))


@pytest.fixture(scope="module")
def text_calib(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  return calibrate(model, str(path), num_batches=2, max_tokens=40, seed=5)  # all 11 rows


def test_statistics_equal_a_numpy_recomputation(model, text_calib):
  """Counts, summed gates and mean probabilities from the ffn_norm output (taken without
  the layer's sow) and the gate weights in float64; padding excluded."""
  cal, cfg = text_calib, model.cfg
  x_NxBxLxD = ref.moe_inputs(cfg, model.variables, cal.token_ids_BxL)
  w_NxDxE = ref.moe_params(model.variables)["router"]["w_gate"]
  mask = cal.mask_BxL
  n = x_NxBxLxD.shape[0]
  for i in range(n):
    x_TxD = x_NxBxLxD[i][mask]
    logits = x_TxD @ w_NxDxE[i]
    comb, probs = ref.topk_combine(logits, cfg.moe.top_k)
    np.testing.assert_array_equal(cal.counts_NxE[i], (comb > 0).sum(0))
    np.testing.assert_allclose(cal.gate_NxE[i], comb.sum(0), rtol=1e-5)
    np.testing.assert_allclose(cal.mean_probs_NxC[i], probs.mean(0), atol=1e-6)
    # The sampled layer inputs are those of the sampled tokens.
    flat = x_NxBxLxD[i].reshape(-1, x_TxD.shape[-1])
    np.testing.assert_allclose(cal.inputs_NxSxD[i], flat[cal.input_index_S], atol=1e-5)
  # Byte tokenizer: BOS + bytes + EOS per document; the rest of each last row is padding.
  assert cal.tokens == sum(len(t.encode()) + 2 for t in TEXTS)
  assert cal.counts_NxE.sum() == n * cal.tokens * cfg.moe.top_k
  assert cal.sequences == 4 + 1 + 6  # 56, 13 and 88 tokens in rows of 16
  assert cal.layers == [0, 1] and cal.data.endswith("calib.jsonl")
  summary = json.loads(json.dumps(cal.summary()))
  assert summary["counts"]["1"] == cal.counts_NxE[1].tolist()
  assert summary["tokens"] == cal.tokens and summary["sampled_tokens"] == 40


def test_sampled_tokens_are_distinct_unmasked_and_seeded(model, text_calib):
  cal = text_calib
  idx = cal.input_index_S
  assert idx.size == 40 and np.all(np.diff(idx) > 0)
  assert cal.mask_BxL.reshape(-1)[idx].all()
  again = calibrate(model, cal.token_ids_BxL, max_tokens=40, seed=5)  # no mask: other tokens
  whole = calibrate(model, cal.token_ids_BxL, max_tokens=10_000, seed=0)
  assert whole.sampled_tokens == cal.token_ids_BxL.size  # the budget exceeds the tokens
  flat = whole.inputs_NxSxD
  np.testing.assert_allclose(again.inputs_NxSxD, flat[:, again.input_index_S], atol=1e-6)
  other = calibrate(model, cal.token_ids_BxL, max_tokens=40, seed=6)
  assert not np.array_equal(other.input_index_S, again.input_index_S)
  np.testing.assert_array_equal(
      calibrate(model, cal.token_ids_BxL, max_tokens=40, seed=6).input_index_S,
      other.input_index_S)


def test_the_sow_is_a_no_op_without_mutable_intermediates(model):
  ids = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % 258, jnp.int32)
  net = lm.make_model(model.cfg)
  plain, _ = jax.jit(net.apply)(model.variables, ids)
  (sown, _), inter = jax.jit(lambda v, i: net.apply(v, i, mutable=["intermediates"]))(
      model.variables, ids)
  np.testing.assert_array_equal(plain, sown)
  x = inter["intermediates"]["moe_layers"]["block0"]["moe"]["moe_input"][0]
  assert x.shape == (2, 2 * 16, 32)


def test_split_statistics_equal_those_of_capture(model):
  """The default data: capture's rows of the validation split, and capture's routing
  (which reads only the "routing" entry next to the new "moe_input" sow) gives the same
  counts, summed gates and mean probabilities."""
  cfg = model.cfg
  cal = calibrate(model, "val", num_batches=1, max_tokens=8)
  r = capture(model, "val", num_batches=1)
  ids, mask, what = calibration_rows(cfg, "val", 1)
  assert what == "val" and mask.all() and ids.shape == (cfg.train.batch_size, cfg.train.seq_len)
  np.testing.assert_array_equal(cal.token_ids_BxL, r.token_ids_BxL)
  np.testing.assert_array_equal(ids, r.token_ids_BxL)
  n, e = len(r.layers), cfg.moe.num_experts
  np.testing.assert_array_equal(cal.counts_NxE, r.selected_NxBxLxE.reshape(n, -1, e).sum(1))
  np.testing.assert_allclose(cal.gate_NxE, r.weights_NxBxLxE.reshape(n, -1, e).sum(1),
                             rtol=1e-5)
  np.testing.assert_allclose(cal.mean_probs_NxC, r.probs_NxBxLxC.reshape(n, -1, e).mean(1),
                             atol=1e-6)


def test_a_router_without_probabilities():
  """Hash routing: no learned scores, so no mean probabilities; counts still add up to
  top_k per token."""
  cfg = tiny_config(router="hash")
  cal = calibrate(Model(cfg, lm.init(jax.random.key(0), cfg)), "val", num_batches=1)
  assert cal.mean_probs_NxC is None and cal.sequences == cfg.train.batch_size
  np.testing.assert_array_equal(cal.counts_NxE.sum(-1), cal.tokens * cfg.moe.top_k)
  np.testing.assert_allclose(cal.gate_NxE.sum(-1), cal.tokens, rtol=1e-6)  # weights sum to 1
  assert "mean_probs" not in cal.summary()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(total=st.integers(1, 500), n=st.integers(1, 600))
def test_evenly_spaced_property(total, n):
  idx = evenly_spaced(total, n)
  assert idx.size == min(total, n)
  assert idx[0] == 0 and (idx.size == 1 or idx[-1] == total - 1)
  assert np.all(np.diff(idx) >= 1) and idx.max() < total


def test_errors_name_the_option(model, tmp_path):
  dense = tiny_config()
  dense.moe.enabled = False
  with pytest.raises(ValueError, match="no MoE layer"):
    calibrate(Model(dense, {}), "val")
  with pytest.raises(ValueError, match="'test' is neither a split"):
    calibrate(model, "test")
  with pytest.raises(ValueError, match="neither a split"):
    calibrate(model, str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "calib.csv"
  bad.write_text("a,b\n")
  with pytest.raises(ValueError, match="not a .txt file or a .jsonl file"):
    calibrate(model, str(bad))
  with pytest.raises(ValueError, match=r"int array \[B, L\]"):
    calibrate(model, np.zeros((2, 3, 4), np.int32))
  with pytest.raises(ValueError, match=r"lie in \[0, 258\)"):
    calibrate(model, np.full((2, 16), 258, np.int32))
  with pytest.raises(ValueError, match="max_tokens=0"):
    calibrate(model, "val", max_tokens=0)
  with pytest.raises(ValueError, match="num_batches=0"):
    calibrate(model, "val", num_batches=0)
  with pytest.raises(ValueError, match="data is a list"):
    calibrate(model, [1, 2])
