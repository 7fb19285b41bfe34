"""Quantized experts (moejax/moe/experts/quantized.py): the codec against a NumPy reference,
its error bounds, packing, and the model running on packed experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moejax import layout
from moejax import model as lm
from moejax.checks import ConfigError
from moejax.compress import quantize as cq
from moejax.moe.experts import get_family
from moejax.moe.experts import quantized as q
from moejax.validation import validate
from tests.conftest import tiny_config
from tests.moe.experts import quant_reference as ref

CASES = [("sym", 8), ("sym", 4), ("sym", 2), ("asym", 8), ("asym", 4), ("asym", 2),
         ("fp8", 8)]


@st.composite
def weights(draw, min_group: int = 1):
  """(w [2, K, 3] or [3, 2, K], group size, group axis) with K = group * groups."""
  group = draw(st.sampled_from([g for g in (1, 2, 4, 8) if g >= min_group]))
  groups = draw(st.integers(1, 3))
  axis = draw(st.sampled_from([1, 2]))
  shape = (2, group * groups, 3) if axis == 1 else (3, 2, group * groups)
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  w = draw(hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32))) * np.float32(
      scale)
  # XLA:CPU flushes float32 subnormals to zero, NumPy does not: such weights are zero here
  return np.where(np.abs(w) < 1e-30, np.float32(0), w), group, axis


@pytest.mark.parametrize("scheme,bits", CASES)
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data())
def test_quantize_matches_the_numpy_reference(scheme, bits, data):
  w, group, axis = data.draw(weights(min_group=8 // bits if scheme != "fp8" else 1))
  got = jax.tree.map(np.asarray, q.quantize(jnp.asarray(w), bits, scheme, group, axis))
  want = ref.quantize(w, bits, scheme, group, axis)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key].astype(np.float32), want[key].astype(np.float32),
                                  err_msg=key)
  deq = np.asarray(q.dequantize(got, bits, scheme, group, axis))
  np.testing.assert_array_equal(deq, ref.dequantize(want, bits, scheme, group, axis))


@pytest.mark.parametrize("scheme,bits", [c for c in CASES if c[0] != "fp8"])
@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=st.data())
def test_integer_round_trip_error_is_at_most_half_a_step(scheme, bits, data):
  w, group, axis = data.draw(weights(min_group=8 // bits))
  stored = q.quantize(jnp.asarray(w), bits, scheme, group, axis)
  err = np.abs(w - np.asarray(q.dequantize(stored, bits, scheme, group, axis)))
  step = np.repeat(np.asarray(stored["scale"], np.float32), group, axis=axis)
  assert np.all(err <= step / 2 * (1 + 1e-6) + 1e-7 * np.abs(w)), np.max(err - step / 2)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=st.data())
def test_fp8_round_trip_error_is_e4m3_rounding(data):
  w, group, axis = data.draw(weights())
  stored = q.quantize(jnp.asarray(w), 8, "fp8", group, axis)
  s = np.repeat(np.asarray(stored["scale"], np.float32), group, axis=axis)
  err = np.abs(w - np.asarray(q.dequantize(stored, 8, "fp8", group, axis)))
  # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal spacing 2^-9, times the scale
  bound = np.maximum(np.abs(w) * 2.0 ** -4, s * 2.0 ** -10)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-7 * np.abs(w))


@pytest.mark.parametrize("bits", [2, 4, 8])
@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=st.data())
def test_pack_unpack_round_trip_and_layout(bits, data):
  per = 8 // bits
  n = data.draw(st.integers(1, 4)) * per
  axis = data.draw(st.sampled_from([0, 1]))
  shape = (n, 3) if axis == 0 else (3, n)
  codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2 ** bits - 1)))
  packed = np.asarray(q.pack(jnp.asarray(codes), bits, axis))
  assert packed.dtype == np.uint8 and packed.shape[axis] == n // per
  np.testing.assert_array_equal(np.asarray(q.unpack(jnp.asarray(packed), bits, axis)), codes)
  lines = np.moveaxis(codes, axis, -1)
  want = np.stack([ref.pack_bytes(line, bits) for line in lines])
  np.testing.assert_array_equal(np.moveaxis(packed, axis, -1), want)


def test_zero_groups_and_asym_constant_groups_round_trip_exactly():
  """A zero group has scale 0 (every scheme); a constant group is its asym zero point when
  that is a float16 value (scale 0)."""
  w = np.zeros((1, 8, 2), np.float32)
  w[0, 4:, 1] = 0.25
  for scheme, bits in CASES:
    stored = q.quantize(jnp.asarray(w), bits, scheme, 4, 1)
    deq = np.asarray(q.dequantize(stored, bits, scheme, 4, 1))
    np.testing.assert_array_equal(deq[:, :, 0], 0.0)
    assert float(stored["scale"][0, 0, 0]) == 0.0
    if scheme == "asym":
      np.testing.assert_array_equal(deq, w)
      assert float(stored["scale"][0, 1, 1]) == 0.0


# --------------------------------------------------------------------------- the model


def _qcfg(scheme: str, counts: dict[int, int], **moe) -> object:
  cfg = tiny_config(**moe)
  cfg.moe.quant.scheme = scheme
  for b, n in counts.items():
    cfg.moe.quant[f"experts{b}"] = n
  return cfg


def _ids():
  return (jnp.arange(64, dtype=jnp.int32).reshape(4, 16) * 7 + 3) % 250


def _float_with(cfg, variables, spec) -> dict:
  """The float model's variables with every expert leaf replaced by its dequantized value
  (computed by the NumPy reference from the stored arrays)."""
  stored = layout.get(variables[q.COLLECTION], layout.EXPERTS_PATH)
  slot = np.asarray(stored[q.SLOT])
  leaves = get_family(cfg.moe).leaves()
  experts = dict(layout.get(variables["params"], layout.EXPERTS_PATH)) if layout.has(
      variables["params"], layout.EXPERTS_PATH) else {}
  for name, leaf in leaves.items():
    if not q.quantizable(leaf):
      continue
    ax, ea = q.group_axis(leaf), leaf.expert_axis
    layers = []
    for p in range(slot.shape[0]):
      parts = [ref.dequantize(jax.tree.map(lambda a: np.asarray(a)[p], stored[name][f"b{b}"]),
                              b, spec.scheme, spec.group_size, ax) for b, _ in spec.classes]
      layers.append(np.take(np.concatenate(parts, axis=ea), slot[p], axis=ea))
    experts[name] = jnp.asarray(np.stack(layers))
  params = layout.replace(variables["params"], layout.EXPERTS_PATH, experts)
  return {**{k: v for k, v in variables.items() if k != q.COLLECTION}, "params": params}


@pytest.mark.parametrize("dispatch", ["dense", "capacity", "dropless"])
def test_quantized_logits_equal_the_float_model_on_the_dequantized_experts(dispatch):
  """Mixed classes with shuffled slots: batched (dense, capacity) and ragged (dropless)."""
  src = tiny_config(dispatch=dispatch, capacity_factor=4.0)
  v = lm.init(jax.random.key(3), src)
  r = cq.quantize_run(src, v, "asym", bits=4)  # the packed model ...
  bits = np.asarray([[8, 4, 2, 4], [2, 4, 4, 8]])
  spec = q.QuantSpec("asym", 8, ((8, 1), (4, 2), (2, 1)))
  cfg = cq.quantized_config(src, "asym", 8, {8: 1, 4: 2, 2: 1})
  qv = cq.quantize_experts(src, v, spec, bits)  # ... and one with three classes
  for c, variables, sp in ((r.cfg, r.variables, r.spec), (cfg, qv, spec)):
    got, _ = lm.apply(variables, _ids(), c)
    want, _ = lm.apply(_float_with(src, variables, sp), _ids(), src)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  slot = np.asarray(qv[q.COLLECTION]["moe_layers"]["block0"]["moe"]["experts"][q.SLOT])
  np.testing.assert_array_equal(slot, [[0, 1, 3, 2], [3, 1, 2, 0]])
  np.testing.assert_array_equal(np.stack([q.expert_bits(s, spec) for s in slot]), bits)


def test_mlp_experts_with_biases_keep_the_biases_float():
  src = tiny_config(expert="mlp", dispatch="dropless")
  src.moe.mlp.bias = True
  v = lm.init(jax.random.key(4), src)
  v = jax.tree.map(lambda a: a + 0.01 if a.dtype == jnp.float32 else a, v)  # nonzero biases
  r = cq.quantize_run(src, v, "sym", bits=8)
  kept = layout.get(r.variables["params"], layout.EXPERTS_PATH)
  assert sorted(kept) == ["b_in", "b_out"]
  got, _ = lm.apply(r.variables, _ids(), r.cfg)
  want, _ = lm.apply(_float_with(src, r.variables, r.spec), _ids(), src)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_int8_changes_the_logits_little_and_less_than_int2():
  src = tiny_config()
  v = lm.init(jax.random.key(5), src)
  base = np.asarray(lm.apply(v, _ids(), src)[0])
  diff = {}
  for bits in (8, 2):
    r = cq.quantize_run(src, v, "sym", bits=bits)
    diff[bits] = np.max(np.abs(np.asarray(lm.apply(r.variables, _ids(), r.cfg)[0]) - base))
  assert diff[8] < 0.05 * np.std(base) and diff[8] < diff[2] / 20, (diff, np.std(base))


def test_fresh_init_has_the_stored_layout_and_trains_only_params():
  """lm.init of a quantized config gives the tree --method quantize writes (so a run
  resumes); gradients reach the router and attention, never the packed experts."""
  cfg = _qcfg("sym", {8: 2, 4: 1, 2: 1})
  validate(cfg)
  fresh = lm.init(jax.random.key(0), cfg)
  src = tiny_config()
  spec = q.QuantSpec.from_config(cfg.moe)
  packed = cq.quantize_experts(src, lm.init(jax.random.key(1), src), spec,
                               np.asarray([[8, 8, 4, 2], [2, 8, 8, 4]]))
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, str(a.dtype)), t)  # noqa: E731
  assert shapes(fresh) == shapes(packed)
  slot = fresh[q.COLLECTION]["moe_layers"]["block0"]["moe"]["experts"][q.SLOT]
  np.testing.assert_array_equal(slot, np.tile(np.arange(4), (2, 1)))
  assert "experts" not in fresh["params"]["moe_layers"]["block0"]["moe"]
  # the fresh experts are the float initialisation quantized: not degenerate
  w = q.read_leaf(jax.tree.map(lambda a: a[0], fresh[q.COLLECTION]["moe_layers"]["block0"]
                               ["moe"]["experts"]["w_up"]), slot[0], get_family(cfg.moe)
                  .leaves()["w_up"], spec)
  assert 0.5 < float(jnp.std(w)) * np.sqrt(32) < 1.5

  def loss(params):
    logits, _ = lm.make_model(cfg).apply({**fresh, "params": params}, _ids())
    return jnp.mean(jax.nn.logsumexp(logits, -1))
  grads = jax.grad(loss)(fresh["params"])
  router = grads["moe_layers"]["block0"]["moe"]["router"]["w_gate"]
  assert float(jnp.max(jnp.abs(router))) > 0


def test_config_checks_name_the_key():
  cases = [
      (_qcfg("int3", {8: 4}), "moe.quant.scheme='int3'"),
      (_qcfg("sym", {8: 2, 4: 1}), "moe.quant.experts8.*must equal moe.num_experts=4"),
      (_qcfg("fp8", {8: 2, 4: 2}), "moe.quant.experts4=2 .*fp8.*widths: \\[8\\]"),
      (_qcfg("none", {8: 4}), "moe.quant.experts8=4 .*must be 0 with moe.quant.scheme='none'"),
  ]
  odd = _qcfg("sym", {8: 4})
  odd.moe.quant.group_size = 5
  cases.append((odd, "moe.quant.group_size=5 .*must divide the experts' w_gate input dim D=32"))
  two = _qcfg("sym", {2: 4})
  two.moe.quant.group_size = 2
  cases.append((two, "moe.quant.group_size=2 .*multiple of 4 with 2-bit experts"))
  ep = _qcfg("sym", {8: 4})
  ep.parallel.expert = 2
  cases.append((ep, "parallel.expert=2 .*quantized experts do not run expert-parallel"))
  up = _qcfg("sym", {8: 4})
  up.init.from_dense = "/somewhere"
  cases.append((up, "init.from_dense='/somewhere' .*writes float experts"))
  for cfg, message in cases:
    with pytest.raises(ConfigError, match=message):
      validate(cfg)
  validate(_qcfg("asym", {8: 1, 4: 2, 2: 1}))


def test_fp8_codes_are_float8_e4m3():
  stored = q.quantize(jnp.linspace(-1, 1, 16).reshape(1, 16, 1), 8, "fp8", 8, 1)
  assert stored["codes"].dtype == jnp.float8_e4m3fn == ml_dtypes.float8_e4m3fn
  assert stored["scale"].dtype == jnp.float16
