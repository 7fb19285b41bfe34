"""MLP and SwiGLU expert families: every path against a NumPy float64 reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import pytest
from hypothesis import given, settings, strategies as st

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.moe import experts as ex
from moejax.validation import validate
from tests.conftest import tiny_config

D, F = 6, 10

NP_ACT = {
    "gelu": lambda x: 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0.0),
    "relu2": lambda x: np.maximum(x, 0.0) ** 2,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def _weights(family, e, seed=0):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(leaf.shape(e, D, F)) * 0.4).astype(np.float32)
          for k, leaf in family.leaves().items()}


def _np_expert(family, w, e, x):
  """One expert e on rows x [n, D], float64, by the family's formula."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  if isinstance(family, ex.SwiGLUExperts):
    g, u = x @ w["w_gate"][e], x @ w["w_up"][e]
    return (g / (1.0 + np.exp(-g)) * u) @ w["w_down"][e]
  h = x @ w["w_in"][e] + (w["b_in"][e] if family.bias else 0.0)
  y = NP_ACT[family.activation](h) @ w["w_out"][e]
  return y + (w["b_out"][e] if family.bias else 0.0)


FAMILIES = [ex.SwiGLUExperts()] + [ex.MLPExperts(a, b) for a in sorted(NP_ACT)
                                   for b in (False, True)]
IDS = [f.name if isinstance(f, ex.SwiGLUExperts) else f"mlp-{f.activation}-{f.bias}"
       for f in FAMILIES]


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_batched_and_dense_match_reference(family):
  e, c = 3, 5
  w = _weights(family, e)
  x = np.random.default_rng(1).standard_normal((e, c, D)).astype(np.float32)
  y = np.asarray(jax.jit(lambda w, x: family.batched(w, x, jnp.float32))(w, x))
  want = np.stack([_np_expert(family, w, i, x[i].astype(np.float64)) for i in range(e)])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  one = {k: np.take(v, 1, axis=family.leaves()[k].expert_axis) for k, v in w.items()}
  yd = np.asarray(family.dense(one, jnp.asarray(x[1]), jnp.float32))
  np.testing.assert_allclose(yd, want[1], rtol=1e-4, atol=1e-5)


def _grouped_reference(family, w, x, sizes, offset, e_loc, scale):
  out = np.zeros((x.shape[0], D))
  start = 0
  for g, n in enumerate(sizes):
    if offset <= g < offset + e_loc:
      rows = x[start:start + n].astype(np.float64)
      out[start:start + n] = _np_expert(family, w, g - offset, rows) * scale[start:start + n, None]
    start += n
  return out


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=4, max_size=4), pad=st.integers(0, 4),
       fam=st.sampled_from(range(len(FAMILIES))))
def test_grouped_matches_reference_with_shards_and_dead_rows(sizes, pad, fam):
  """Rows of the other shard's experts and rows past the groups come out zero."""
  family = FAMILIES[fam]
  w = _weights(family, 4, seed=fam)
  m = sum(sizes) + pad
  rng = np.random.default_rng(sum(sizes) * 7 + pad)
  x = rng.standard_normal((max(m, 1), D)).astype(np.float32)
  scale = rng.uniform(0.2, 1.5, max(m, 1)).astype(np.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  total = np.zeros((max(m, 1), D))
  for offset in (0, 2):  # two expert shards of 2 experts each
    part = {k: np.take(v, [offset, offset + 1], axis=family.leaves()[k].expert_axis)
            for k, v in w.items()}
    y = family.grouped(jax.tree.map(jnp.asarray, part), jnp.asarray(x), gs, jnp.float32,
                       backend="cpu", group_offset=offset, scale_A=jnp.asarray(scale))
    want = _grouped_reference(family, part, x, sizes, offset, 2, scale)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    total += np.asarray(y)
  full = family.grouped(jax.tree.map(jnp.asarray, w), jnp.asarray(x), gs, jnp.float32,
                        backend="cpu", scale_A=jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(full), total, rtol=1e-4, atol=1e-5)
  if pad:
    np.testing.assert_array_equal(np.asarray(full)[sum(sizes):], 0.0)


@pytest.mark.parametrize("family", [FAMILIES[0], ex.MLPExperts("gelu", True)],
                         ids=["swiglu", "mlp-bias"])
def test_grouped_gradients_match_batched(family):
  """d/dw and d/dx of the ragged path equal those of per-expert buffers."""
  e, per = 3, 4
  w = jax.tree.map(jnp.asarray, _weights(family, e, seed=3))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((e * per, D)), jnp.float32)
  ct = jnp.asarray(np.random.default_rng(5).standard_normal((e * per, D)), jnp.float32)
  gs = jnp.full((e,), per, jnp.int32)

  def ragged(w, x):
    return jnp.sum(family.grouped(w, x, gs, jnp.float32, backend="cpu") * ct)

  def buffers(w, x):
    return jnp.sum(family.batched(w, x.reshape(e, per, D), jnp.float32).reshape(-1, D) * ct)

  ga = jax.grad(ragged, argnums=(0, 1))(w, x)
  gb = jax.grad(buffers, argnums=(0, 1))(w, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ga, gb)


def test_bfloat16_is_close_to_float32():
  family = ex.MLPExperts("relu2", True)
  w = jax.tree.map(jnp.asarray, _weights(family, 2))
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, D)), jnp.float32)
  y32 = family.batched(w, x, jnp.float32)
  y16 = family.batched(w, x, jnp.bfloat16)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, rtol=5e-2, atol=5e-2)
  assert not np.array_equal(np.asarray(y16), np.asarray(y32))


def test_leaves_and_param_count():
  assert list(ex.MLPExperts(bias=True).leaves()) == ["w_in", "b_in", "w_out", "b_out"]
  assert list(ex.MLPExperts(bias=False).leaves()) == ["w_in", "w_out"]
  assert ex.MLPExperts(bias=True).param_count(D, F) == 2 * D * F + F + D
  assert ex.SwiGLUExperts().param_count(D, F) == 3 * D * F
  leaf = ex.Leaf(("E", "F", "D"), fan_in="F", output=True, fsdp="F")
  assert leaf.expert_axis == 0 and leaf.shape(4, D, F) == (4, F, D)
  assert leaf.shape(None, D, F) == (F, D)
  with pytest.raises(ValueError, match="'E' at most once"):
    ex.Leaf(("E", "D", "E"))
  assert ex.Leaf(("D", "F")).shared  # no expert axis: one array for all experts
  with pytest.raises(ValueError, match="init"):
    ex.Leaf(("E", "D"), init="uniform")
  with pytest.raises(ValueError, match="fsdp"):
    ex.Leaf(("E", "D"), fsdp="F")


def test_config_selects_and_checks_the_family():
  c = default_config()
  c.moe.expert, c.moe.mlp.activation, c.moe.mlp.bias = "mlp", "relu2", True
  validate(c)
  assert ex.get_family(c.moe) == ex.MLPExperts("relu2", True)
  c.moe.mlp.activation = "tanh"
  with pytest.raises(ConfigError, match=r"moe.mlp.activation='tanh'.*gelu"):
    validate(c)
  c = default_config()
  c.moe.expert = "conv"
  with pytest.raises(ConfigError, match=r"moe.expert='conv'.*mlp.*swiglu"):
    validate(c)


def test_mlp_model_counts_and_shared_experts():
  """An MLP-expert model's parameter tree has the declared leaves; counts agree with it."""
  from moejax import layout, model as lm  # noqa: PLC0415
  cfg = tiny_config(expert="mlp", num_shared_experts=1)
  cfg.moe.mlp.bias = True
  variables = lm.init(jax.random.key(0), cfg)
  moe = layout.moe_params(variables["params"])
  p = cfg.model.num_layers
  e, d, f = cfg.moe.num_experts, cfg.model.d_model, cfg.moe.expert_hidden
  assert {k: v.shape for k, v in moe["experts"].items()} == {
      "w_in": (p, e, d, f), "b_in": (p, e, f), "w_out": (p, e, f, d), "b_out": (p, e, d)}
  assert {k: v.shape for k, v in moe["shared"].items()} == {
      "w_in": (p, d, f), "b_in": (p, f), "w_out": (p, f, d), "b_out": (p, d)}
  total = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert lm.param_counts(cfg)["params_total"] == total
