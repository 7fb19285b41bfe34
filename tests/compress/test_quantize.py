"""Expert quantization (moejax/compress/quantize.py): the bit allocation against a brute force
and the greedy, sensitivities against a NumPy layer, the packed run on disk, bad input."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moejax import analysis, layout
from moejax import model as lm
from moejax.compress import calibrate
from moejax.compress import quantize as cq
from moejax.init.sources import load_run, run_config
from moejax.moe.experts import get_family
from moejax.moe.experts import quantized as q
from moejax.train import trainer
from tests.compress import reference as ref
from tests.conftest import tiny_config
from tests.moe.experts import quant_reference as qref

WIDTHS = (8, 4, 2)


def brute_force(sens_NxExW: np.ndarray, widths, avg_bits: float) -> float:
  """The least summed sensitivity over every class-size vector within the budget and every
  per-layer assignment with those class sizes."""
  n, e, w = sens_NxExW.shape
  best = np.inf
  for counts in itertools.product(range(e + 1), repeat=w):
    if sum(counts) != e or np.dot(counts, widths) > avg_bits * e + 1e-9:
      continue
    labels = [i for i, c in enumerate(counts) for _ in range(c)]
    total = 0.0
    for layer in range(n):
      total += min(sum(sens_NxExW[layer, ex, lab] for ex, lab in enumerate(p))
                   for p in set(itertools.permutations(labels)))
    best = min(best, total)
  return best


def _feasible(bits_NxE: np.ndarray, widths, avg_bits: float) -> None:
  counts = [cq.class_counts(row, widths) for row in bits_NxE]
  assert all(c == counts[0] for c in counts), counts
  assert sum(b * n for b, n in counts[0].items()) <= avg_bits * bits_NxE.shape[1] + 1e-9
  assert set(np.unique(bits_NxE)) <= set(widths)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data(), n=st.integers(1, 3), e=st.integers(1, 4),
       avg=st.floats(2.0, 8.0))
def test_milp_equals_brute_force_and_beats_greedy(data, n, e, avg):
  sens = data.draw(hnp.arrays(np.float64, (n, e, 3), elements=st.floats(0, 1)))
  milp = cq.milp_allocation(sens, WIDTHS, avg)
  greedy = cq.greedy_allocation(sens, WIDTHS, avg)
  _feasible(milp, WIDTHS, avg)
  _feasible(greedy, WIDTHS, avg)
  best = cq.allocation_cost(sens, WIDTHS, milp)
  np.testing.assert_allclose(best, brute_force(sens, WIDTHS, avg), rtol=1e-7, atol=1e-9)
  assert best <= cq.allocation_cost(sens, WIDTHS, greedy) + 1e-9


def test_allocation_edges():
  sens = np.asarray([[[0.0, 1.0, 5.0], [0.0, 2.0, 3.0]]])
  np.testing.assert_array_equal(cq.milp_allocation(sens, WIDTHS, 8.0), [[8, 8]])
  np.testing.assert_array_equal(cq.milp_allocation(sens, WIDTHS, 2.0), [[2, 2]])
  # 6 bits on average over 2 experts: {8, 4} (cost 2 or 1) or {4, 8}; {8, 2} costs 3
  np.testing.assert_array_equal(cq.milp_allocation(sens, WIDTHS, 6.0), [[4, 8]])
  # the greedy steps one width at a time and stops at {4, 8}; {2, 8} is cheaper
  sens = np.asarray([[[0.0, 1.0, 0.0], [0.0, 3.0, 4.0]]])
  np.testing.assert_array_equal(cq.greedy_allocation(sens, WIDTHS, 6.0), [[4, 8]])
  np.testing.assert_array_equal(cq.milp_allocation(sens, WIDTHS, 6.0), [[2, 8]])


# --------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  variables = lm.init(jax.random.key(11), cfg)
  calib = calibrate(analysis.Model(cfg, variables), "val", num_batches=1, max_tokens=48)
  return cfg, variables, calib


def test_sensitivity_matches_a_numpy_layer(tiny):
  cfg, variables, calib = tiny
  got = cq.sensitivity(cfg, variables, calib, "asym", 8, WIDTHS)
  moe = ref.moe_params(variables)
  leaves = get_family(cfg.moe).leaves()
  for n in range(2):
    x = np.asarray(calib.inputs_NxSxD[n], np.float64)
    experts = {k: v[n] for k, v in moe["experts"].items()}
    full = ref.topk_swiglu_layer(x, moe["router"]["w_gate"][n], experts, 2)
    for e in range(4):
      for i, b in enumerate(WIDTHS):
        one = dict(experts)
        for name, leaf in leaves.items():
          w = np.array(experts[name])
          ax = q.group_axis(leaf) - 1  # without the expert axis
          w[e] = qref.dequantize(qref.quantize(w[e], b, "asym", 8, ax), b, "asym", 8, ax)
          one[name] = w
        y = ref.topk_swiglu_layer(x, moe["router"]["w_gate"][n], one, 2)
        want = np.mean(np.sum((y - full) ** 2, axis=-1))
        np.testing.assert_allclose(got[n, e, i], want, rtol=2e-3, err_msg=(n, e, b))
  assert np.all(got[:, :, 0] < got[:, :, 1]) and np.all(got[:, :, 1] < got[:, :, 2])


def test_mixed_precision_run_is_the_milp_allocation(tiny):
  cfg, variables, calib = tiny
  r = cq.quantize_run(cfg, variables, "sym", avg_bits=5.0, group_size=16, calib=calib)
  np.testing.assert_array_equal(r.bits_NxE, cq.milp_allocation(r.sensitivity_NxExW,
                                                                WIDTHS, 5.0))
  _feasible(r.bits_NxE, WIDTHS, 5.0)
  assert r.objective <= r.greedy_objective + 1e-12
  counts = cq.class_counts(r.bits_NxE[0], WIDTHS)
  assert {b: r.cfg.moe.quant[f"experts{b}"] for b in WIDTHS} == counts
  assert r.cfg.moe.quant.scheme == "sym" and r.cfg.moe.quant.group_size == 16
  slot = np.asarray(layout.get(r.variables[q.COLLECTION], layout.EXPERTS_PATH)[q.SLOT])
  np.testing.assert_array_equal(np.stack([q.expert_bits(s, r.spec) for s in slot]),
                                r.bits_NxE)


@pytest.mark.parametrize("scheme,bits", [("sym", 4), ("asym", 2), ("fp8", 8)])
def test_bytes_are_measured_and_match_the_format(tiny, scheme, bits):
  cfg, variables, _ = tiny
  r = cq.quantize_run(cfg, variables, scheme, bits=bits, group_size=16)
  got = cq.expert_bytes(r.variables)
  weights = 2 * 4 * 3 * 32 * 32  # layers x experts x leaves x D x F
  assert got["codes"] == weights * bits // 8
  assert got["scale"] == weights // 16 * 2  # float16
  assert got["zero"] == (weights // 16 * 2 if scheme == "asym" else 0)
  assert got["slot"] == 2 * 4 * 4 and got["float"] == 0
  assert cq.expert_bytes(variables)["float"] == weights * 4
  assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_the_run_directory_keeps_packed_arrays_and_dtypes(tiny, tmp_path):
  cfg, variables, _ = tiny
  for scheme, bits in (("asym", 4), ("fp8", 8)):
    r = cq.quantize_run(cfg, variables, scheme, bits=bits)
    out = str(tmp_path / scheme)
    trainer.write_run(r.cfg, r.variables, out)
    params, collections, _ = load_run(out)
    back = {"params": params, **collections}
    assert run_config(out).moe.quant.to_dict() == r.cfg.moe.quant.to_dict()
    flat = jax.tree_util.tree_flatten_with_path(r.variables[q.COLLECTION])[0]
    flat_back = dict(jax.tree_util.tree_flatten_with_path(back[q.COLLECTION])[0])
    assert len(flat) == len(flat_back)
    for path, a in flat:
      b = flat_back[path]
      assert np.asarray(b).dtype == np.asarray(a).dtype and b.shape == a.shape, path
      np.testing.assert_array_equal(np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1
                                    else np.asarray(b), np.asarray(a).view(np.uint8)
                                    if a.dtype.itemsize == 1 else np.asarray(a))
    stored = layout.get(back[q.COLLECTION], layout.EXPERTS_PATH)
    want = q.FP8 if scheme == "fp8" else np.uint8
    assert stored["w_gate"][f"b{bits}"]["codes"].dtype == want
    assert stored["w_gate"][f"b{bits}"]["scale"].dtype == np.float16
    assert stored[q.SLOT].dtype == np.int32
    assert cq.expert_bytes(back) == cq.expert_bytes(r.variables)
    ids = np.arange(32, dtype=np.int32).reshape(2, 16) % 250
    np.testing.assert_array_equal(np.asarray(lm.apply(back, ids, r.cfg)[0]),
                                  np.asarray(lm.apply(r.variables, ids, r.cfg)[0]))


def test_bad_options_name_the_option(tiny):
  cfg, variables, _ = tiny
  quantized = cq.quantize_run(cfg, variables, "sym", bits=8)
  ep = tiny_config()
  ep.parallel.expert = 2
  cases = [
      (dict(bits=1), r"bits=1 is not a width of scheme='sym'; allowed: \[8, 4, 2\]"),
      (dict(bits=3), r"bits=3 is not a width"),
      (dict(bits=4, scheme="fp8"), r"bits=4 is not a width of scheme='fp8'; allowed: \[8\]"),
      (dict(bits=4, scheme="nf4"), r"scheme='nf4' is not a quantization scheme"),
      (dict(), "give exactly one of bits .* and avg_bits"),
      (dict(bits=4, avg_bits=4.0), "give exactly one of"),
      (dict(avg_bits=1.5), r"avg_bits=1.5 is unreachable: allowed: .* in \[2, 8\]"),
      (dict(avg_bits=8.5), r"avg_bits=8.5 is unreachable"),
      (dict(avg_bits=8.0, scheme="fp8"), "avg_bits needs several widths"),
      (dict(bits=8, group_size=5), "group_size=5 does not divide the experts' w_gate input "
                                   "dim D=32"),
      (dict(bits=8, group_size=0), "group_size=0; allowed: a positive integer"),
      (dict(bits=2, group_size=2), "group_size=2 with 2-bit experts: allowed: a multiple of 4"),
      (dict(avg_bits=4.0), "needs calibration statistics"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      cq.quantize_run(cfg, variables, **kwargs)
  with pytest.raises(ValueError, match="parallel.expert=2 .*do not run expert-parallel"):
    cq.quantize_run(ep, variables, bits=8)
  with pytest.raises(ValueError, match=r"moe.quant.scheme='sym': the run's experts are "
                                       r"already quantized \(--method quantize\)"):
    cq.quantize_run(quantized.cfg, quantized.variables, bits=4)
  bad = jax.tree.map(lambda a: a, variables)
  w = np.array(bad["params"]["moe_layers"]["block0"]["moe"]["experts"]["w_up"])
  w[0, 0, 0, 0] = np.nan
  bad["params"]["moe_layers"]["block0"]["moe"]["experts"]["w_up"] = w
  with pytest.raises(ValueError, match="the experts' w_up holds non-finite values"):
    cq.quantize_run(cfg, bad, bits=8)
  big = jax.tree.map(lambda a: a, variables)
  big["params"]["moe_layers"]["block0"]["moe"]["experts"]["w_down"] = np.full(
      (2, 4, 32, 32), 1e7, np.float32)
  with pytest.raises(ValueError, match="w_down .*needs scales beyond float16's range"):
    cq.quantize_run(cfg, big, bits=8)


def test_a_quantized_run_fine_tunes_all_but_the_packed_experts(tiny, tmp_path):
  """The trainer resumes a quantized run (its fresh init has the stored tree) and its
  optimizer updates the float parameters only: the packed experts stay bit-identical."""
  cfg, variables, _ = tiny
  r = cq.quantize_run(cfg, variables, "sym", bits=4)
  run = str(tmp_path / "run")
  r.cfg.train.steps, r.cfg.train.warmup_steps = 2, 1
  trainer.write_run(r.cfg, r.variables, run)
  c = run_config(run)
  c.train.eval_every = c.train.checkpoint_every = c.train.log_every = 2
  c.train.eval_batches = 1
  trainer.train(c, run)
  params, collections, step = load_run(run)
  assert step == 2
  for a, b in zip(jax.tree.leaves(collections[q.COLLECTION]),
                  jax.tree.leaves(r.variables[q.COLLECTION])):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1
                                  else a, np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1
                                  else b)
  moved = params["moe_layers"]["block0"]["moe"]["router"]["w_gate"] - r.variables["params"][
      "moe_layers"]["block0"]["moe"]["router"]["w_gate"]
  assert float(np.max(np.abs(moved))) > 0
