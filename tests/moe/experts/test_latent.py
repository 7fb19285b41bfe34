"""Latent experts (MoLE): every path against a NumPy float64 per-expert loop, the shared leaves
through counting, sharding, growth and expert parallelism, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax import layout, model as lm
from moejax.checks import ConfigError
from moejax.moe import MoELayer
from moejax.moe import experts as ex
from moejax.moe.experts import quantized
from moejax.validation import validate
from tests.compress import reference as ref
from tests.conftest import REPO, fake_devices, tiny_config

D, F, R = 8, 12, 4
DEVICES = 4  # fake CPU devices of the expert-parallel subprocess


def _weights(family, e, seed=0, scale=0.4):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(leaf.shape(e, D, F)) * scale).astype(np.float32)
          for k, leaf in family.leaves().items()}


def _np_expert(w, e, x):
  """Expert e on rows x [n, D], float64, one product at a time."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  out = np.zeros((x.shape[0], D))
  for i, row in enumerate(np.asarray(x, np.float64)):
    zg = row @ w["a_gate"]  # [R]
    zu = row @ w["a_up"]
    g = np.array([sum(zg[r] * w["b_gate"][e, r, j] for r in range(zg.size)) for j in range(F)])
    u = np.array([sum(zu[r] * w["b_up"][e, r, j] for r in range(zu.size)) for j in range(F)])
    h = g / (1.0 + np.exp(-g)) * u
    out[i] = h @ w["w_down"][e]
  return out


def test_leaves_shapes_and_counts():
  fam = ex.LatentExperts(R)
  leaves = fam.leaves()
  assert list(leaves) == ["a_gate", "a_up", "b_gate", "b_up", "w_down"]
  assert sorted(fam.shared_leaves()) == ["a_gate", "a_up"]
  assert {k: l.shape(5, D, F) for k, l in leaves.items()} == {
      "a_gate": (D, R), "a_up": (D, R), "b_gate": (5, R, F), "b_up": (5, R, F),
      "w_down": (5, F, D)}
  assert fam.param_count(D, F) == 2 * R * F + F * D
  assert fam.shared_param_count(D, F) == 2 * D * R
  assert ex.SwiGLUExperts().shared_param_count(D, F) == 0
  with pytest.raises(ValueError, match="no expert axis"):
    leaves["a_gate"].expert_axis  # noqa: B018
  assert leaves["b_up"].expert_axis == 0
  specs = ex.expert_specs(fam, "expert")
  assert specs["a_gate"] == jax.sharding.PartitionSpec(None, None)
  assert specs["b_gate"] == jax.sharding.PartitionSpec("expert", None, None)
  for bad, match in [(dict(dims=("E", "E", "D")), "'E' at most once"),
                     (dict(dims=("D", "R")), r"letters of .* or of fixed \[\]"),
                     (dict(dims=("D", "R"), fixed=(("R", 0),)), "positive integer sizes"),
                     (dict(dims=("D", "F"), fixed=(("F", 3),)), "other than"),
                     (dict(dims=("D", "R"), fixed=(("R", 2),), fan_in="Q"), "fan_in 'Q'"),
                     (dict(dims=("E", "D"), fsdp="E"), "other than E")]:
    with pytest.raises(ValueError, match=match):
      ex.Leaf(**bad)


def test_batched_and_dense_match_the_reference():
  fam = ex.LatentExperts(R)
  e, c = 3, 4
  w = _weights(fam, e)
  x = np.random.default_rng(1).standard_normal((e, c, D)).astype(np.float32)
  y = np.asarray(jax.jit(lambda w, x: fam.batched(w, x, jnp.float32))(w, x))
  want = np.stack([_np_expert(w, i, x[i]) for i in range(e)])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  one = {k: v if fam.leaves()[k].shared else v[1] for k, v in w.items()}
  yd = np.asarray(fam.dense(one, jnp.asarray(x[1]), jnp.float32))
  np.testing.assert_allclose(yd, want[1], rtol=1e-4, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(0, 4), min_size=4, max_size=4), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_grouped_matches_reference_with_shards_and_dead_rows(sizes, pad, seed):
  """Rows of the other shard's experts and rows past the groups come out zero; the shared
  leaves are the same full arrays in every shard."""
  fam = ex.LatentExperts(R)
  w = _weights(fam, 4, seed=seed)
  m = max(sum(sizes) + pad, 1)
  rng = np.random.default_rng(seed + 1)
  x = rng.standard_normal((m, D)).astype(np.float32)
  scale = rng.uniform(0.2, 1.5, m).astype(np.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  total = np.zeros((m, D))
  for offset in (0, 2):  # two expert shards of 2 experts each
    part = {k: v if fam.leaves()[k].shared else v[offset:offset + 2] for k, v in w.items()}
    y = np.asarray(fam.grouped(jax.tree.map(jnp.asarray, part), jnp.asarray(x), gs,
                               jnp.float32, backend="cpu", group_offset=offset,
                               scale_A=jnp.asarray(scale)))
    want = np.zeros((m, D))
    start = 0
    for g, n in enumerate(sizes):
      if offset <= g < offset + 2 and n:
        want[start:start + n] = _np_expert(w, g, x[start:start + n]) * scale[start:start + n,
                                                                              None]
      start += n
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    total += y
  full = fam.grouped(jax.tree.map(jnp.asarray, w), jnp.asarray(x), gs, jnp.float32,
                     backend="cpu", scale_A=jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(full), total, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(full)[sum(sizes):], 0.0)


@settings(max_examples=8, deadline=None)
@given(rank=st.integers(1, D), seed=st.integers(0, 2**16))
def test_latent_experts_are_swiglu_experts_of_the_product_weights(rank, seed):
  """Property: expert e equals the SwiGLU expert W_gate = A_gate B_gate[e], W_up = A_up
  B_up[e], W_down[e], on every path."""
  fam = ex.LatentExperts(rank)
  w = {k: jnp.asarray(v) for k, v in _weights(fam, 3, seed).items()}
  sw = {"w_gate": jnp.einsum("dr,erf->edf", w["a_gate"], w["b_gate"]),
        "w_up": jnp.einsum("dr,erf->edf", w["a_up"], w["b_up"]), "w_down": w["w_down"]}
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((3, 5, D)), jnp.float32)
  want = ex.SwiGLUExperts().batched(sw, x, jnp.float32)
  np.testing.assert_allclose(fam.batched(w, x, jnp.float32), want, rtol=1e-4, atol=1e-5)
  gs = jnp.full((3,), 5, jnp.int32)
  got = fam.grouped(w, x.reshape(15, D), gs, jnp.float32, backend="cpu")
  np.testing.assert_allclose(got.reshape(3, 5, D), want, rtol=1e-4, atol=1e-5)


def test_grouped_gradients_match_batched():
  """d/dw (shared leaves included) and d/dx of the ragged path equal per-expert buffers'."""
  fam = ex.LatentExperts(R)
  e, per = 3, 4
  w = jax.tree.map(jnp.asarray, _weights(fam, e, seed=3))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((e * per, D)), jnp.float32)
  ct = jnp.asarray(np.random.default_rng(5).standard_normal((e * per, D)), jnp.float32)
  gs = jnp.full((e,), per, jnp.int32)

  def ragged(w, x):
    return jnp.sum(fam.grouped(w, x, gs, jnp.float32, backend="cpu") * ct)

  def buffers(w, x):
    return jnp.sum(fam.batched(w, x.reshape(e, per, D), jnp.float32).reshape(-1, D) * ct)

  ga = jax.grad(ragged, argnums=(0, 1))(w, x)
  gb = jax.grad(buffers, argnums=(0, 1))(w, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ga, gb)
  assert float(jnp.max(jnp.abs(ga[0]["a_gate"]))) > 0


def test_bfloat16_is_close_to_float32():
  fam = ex.LatentExperts(R)
  w = jax.tree.map(jnp.asarray, _weights(fam, 2))
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, D)), jnp.float32)
  y32, y16 = fam.batched(w, x, jnp.float32), fam.batched(w, x, jnp.bfloat16)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, rtol=5e-2, atol=5e-2)
  assert not np.array_equal(np.asarray(y16), np.asarray(y32))


# --------------------------------------------------------------------------- in the layer


def _moe_cfg(dispatch="dropless", router="topk", rank=R, shared=0):
  c = tiny_config(expert="latent", dispatch=dispatch, router=router, capacity_factor=4.0,
                  expert_hidden=F, num_shared_experts=shared)
  c.model.d_model = D
  c.moe.latent.rank = rank
  c.moe.gmm_backend = "xla"
  validate(c)
  return ml_collections.FrozenConfigDict(c.moe)


def _layer_vars(layer, x, seed=0):
  shapes = jax.eval_shape(lambda k: layer.init(k, x), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_every_dispatcher_agrees_with_dense_and_a_swiglu_reference():
  """dense, capacity (nothing dropped), dropless: one function, equal to a NumPy top-k layer
  of SwiGLU experts with the product weights; shared latent experts are added."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, D)), jnp.float32)
  layers = {d: MoELayer(_moe_cfg(d, shared=1)) for d in ("dense", "capacity", "dropless")}
  v = _layer_vars(layers["dense"], x)
  ys = {d: np.asarray(jax.jit(layer.apply)(v, x)[0]) for d, layer in layers.items()}
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  e, s = p["experts"], p["shared"]
  sw = {"w_gate": np.einsum("dr,erf->edf", e["a_gate"], e["b_gate"]),
        "w_up": np.einsum("dr,erf->edf", e["a_up"], e["b_up"]), "w_down": e["w_down"]}
  x64 = np.asarray(x, np.float64).reshape(-1, D)
  want = ref.topk_swiglu_layer(x64, p["router"]["w_gate"], sw, 2)
  g, u = x64 @ s["a_gate"] @ s["b_gate"], x64 @ s["a_up"] @ s["b_up"]
  want = want + (ref.silu(g) * u) @ s["w_down"]
  for d, y in ys.items():
    np.testing.assert_allclose(y.reshape(-1, D), want, rtol=1e-4, atol=1e-5, err_msg=d)


def test_soft_moe_slots_run_latent_experts():
  """Soft MoE (the soft dispatcher's per-expert slot buffers) through latent experts equals
  the same layer with SwiGLU experts of the product weights."""
  cfg = _moe_cfg(router="soft")
  layer = MoELayer(cfg)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, D)), jnp.float32)
  v = _layer_vars(layer, x, seed=2)
  y, _, _ = jax.jit(layer.apply)(v, x)
  e = v["params"]["experts"]
  sw = {"w_gate": jnp.einsum("dr,erf->edf", e["a_gate"], e["b_gate"]),
        "w_up": jnp.einsum("dr,erf->edf", e["a_up"], e["b_up"]), "w_down": e["w_down"]}
  swiglu_cfg = ml_collections.ConfigDict(cfg.to_dict())
  swiglu_cfg.expert = "swiglu"
  sv = {**v, "params": {**v["params"], "experts": sw}}
  y_sw, _, _ = MoELayer(ml_collections.FrozenConfigDict(swiglu_cfg)).apply(sv, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_sw), rtol=1e-4, atol=1e-5)
  assert float(np.max(np.abs(np.asarray(y)))) > 1e-3


# --------------------------------------------------------------------------- in the model


def _model_cfg(**overrides):
  c = tiny_config(expert="latent", expert_hidden=F)
  c.model.d_model, c.model.num_heads, c.model.ffn_hidden = 16, 2, 16
  c.train.seq_len = 8
  c.moe.latent.rank = 6
  for k, val in overrides.items():
    node = c
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = val
  validate(c)
  return c


@pytest.mark.parametrize("overrides", [
    {}, {"moe.num_shared_experts": 1, "moe.shared_hidden": 10, "moe.shared_gate": True},
    {"model.num_layers": 3, "moe.first_dense_layers": 1},
    {"model.num_layers": 4, "moe.every": 2, "moe.latent.rank": 16}])
def test_param_counts_and_flops_are_exact(overrides):
  """Totals equal the initialised tree; a token's inactive parameters are exactly the
  E - k routed experts' own leaves; the shared leaves count once per layer and are
  computed once per expert application."""
  cfg = _model_cfg(**overrides)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  moe = layout.get(p, layout.MOE_PATH)
  n_periods = moe["experts"]["a_gate"].shape[0]
  d, r, f = cfg.model.d_model, cfg.moe.latent.rank, F
  assert moe["experts"]["a_gate"].shape == (n_periods, d, r)
  per_expert = 2 * r * f + f * d
  assert sum(x.size for x in jax.tree.leaves(moe["experts"])) == n_periods * (
      cfg.moe.num_experts * per_expert + 2 * d * r)
  inactive = n_periods * (cfg.moe.num_experts - cfg.moe.top_k) * per_expert
  assert counts["params_active"] == counts["params_total"] - inactive
  m = cfg.model
  shared_extra = n_periods * (cfg.moe.top_k - 1) * 2 * d * r
  want = (6 * (counts["params_active"] - counts["params_embedding"] + m.vocab_size * d
               + shared_extra) + 6 * m.num_layers * cfg.train.seq_len * d)
  assert lm.flops_per_token(cfg) == want


def test_mesh_replicates_shared_leaves_over_the_expert_axis():
  from moejax.parallel import mesh as pm  # noqa: PLC0415
  cfg = _model_cfg()
  leaves = pm.expert_leaves(cfg)
  sizes = {"data": 1, "fsdp": 2, "expert": 2}
  base = ["moe_layers", "block0", "moe", "experts"]
  P = jax.sharding.PartitionSpec
  assert pm.param_spec(base + ["a_gate"], (2, 16, 6), sizes, leaves) == P(None, "fsdp", None)
  assert pm.param_spec(base + ["b_up"], (2, 4, 6, F), sizes, leaves) == P(None, "expert", None,
                                                                         "fsdp")
  assert pm.param_spec(base + ["w_down"], (2, 4, F, 16), sizes, leaves) == P(
      None, "expert", "fsdp", None)


def test_grown_latent_experts_compute_what_the_source_did():
  """Growth copies each expert's own leaves; the copies share the layer's latent projections,
  so the grown model (copies routed as groups) gives the source's logits."""
  from moejax.init import grow  # noqa: PLC0415
  src = _model_cfg(**{"moe.dispatch": "dense"})
  v = lm.init(jax.random.key(1), src)
  ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 258)
  want, _ = lm.apply(v, ids, src)
  fam = ex.get_family(src.moe)
  idx = grow.all_copies(src.moe.num_experts, grow.num_periods(v["params"]), 2)
  grown = grow.grow_params(v["params"], idx, family=fam)
  g_moe, s_moe = layout.moe_params(grown), layout.moe_params(v["params"])
  np.testing.assert_array_equal(g_moe["experts"]["a_gate"], s_moe["experts"]["a_gate"])
  assert g_moe["experts"]["b_gate"].shape[1] == 2 * src.moe.num_experts
  cfg = src.copy_and_resolve_references()
  cfg.moe.num_experts *= 2
  cfg.moe.topk.copies = 2
  got, _ = lm.apply({**v, "params": grown}, ids, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- bad input


def test_rank_is_checked_before_compile():
  for bad in (0, 17, -1):
    c = tiny_config(expert="latent")
    c.model.d_model = 16
    c.moe.latent.rank = bad
    with pytest.raises(ConfigError, match=rf"moe.latent.rank={bad!r} is invalid: allowed: an "
                                          r"integer in \[1, model.d_model=16\]"):
      validate(c)
  c.moe.latent.rank = 16  # = D: allowed (represents any SwiGLU experts)
  validate(c)


def test_quantized_latent_experts_are_refused():
  c = tiny_config(expert="latent")
  c.moe.latent.rank = 8
  c.moe.quant.scheme, c.moe.quant.experts8 = "sym", c.moe.num_experts
  with pytest.raises(ConfigError, match=r"moe.quant.scheme='sym' is invalid: needs experts of "
                                        r"their own: moe.expert='latent' has leaves \['a_gate', "
                                        r"'a_up'\] shared"):
    quantized.check_config(c)
  cfg = tiny_config(expert="latent")
  from moejax.compress import merge, quantize  # noqa: PLC0415
  with pytest.raises(ValueError, match=r"moe.expert='latent': its leaves \['a_gate', 'a_up'\] "
                                       "are shared by all experts of a layer; quantization"):
    quantize.check_quantizable(cfg)
  with pytest.raises(ValueError, match="merging works on experts that own all their weights"):
    merge.check_mergeable(cfg)


def test_upcycling_into_latent_experts_is_refused(tmp_path):
  from moejax.init.upcycle import ffn_to_experts  # noqa: PLC0415
  fam = ex.LatentExperts(R)
  ffn = {"w_gate": np.zeros((D, F)), "w_up": np.zeros((D, F)), "w_down": np.zeros((F, D))}
  with pytest.raises(ValueError, match=r"moe.expert='latent' is invalid for upcycling: its "
                                       r"leaves \['a_gate', 'a_up'\] are shared"):
    ffn_to_experts(ffn, 4, F, "copy", fam)
  run = tmp_path / "dense"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  c = tiny_config(expert="latent")
  c.moe.latent.rank = 8
  c.init.from_dense = str(run)
  with pytest.raises(ConfigError, match=r"moe.expert='latent' is invalid: cannot be upcycled "
                                        r"into with init.from_dense"):
    validate(c)


def test_growing_into_another_family_is_refused(tmp_path):
  from moejax.init.sources import check_sources  # noqa: PLC0415
  src = tiny_config()
  run = tmp_path / "moe"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(src.to_dict()))
  c = tiny_config(expert="latent", num_experts=8)
  c.moe.latent.rank = 8
  c.moe.topk.copies = 2
  c.init.grow_from = str(run)
  with pytest.raises(ValueError, match=r"moe.expert='latent' \(LatentExperts\(rank=8\)\) does "
                                       r"not match the source run .* which has 'swiglu'"):
    check_sources(c)


# --------------------------------------------------------------------------- expert parallel


def test_expert_parallel_equals_one_device():
  """On 4 fake devices (data 2 x expert 2: the shared leaves' gradients are summed over both
  axes): outputs and gradients of the latent layer, shared leaves included, equal the
  single-device layer's, for dropless and capacity dispatch (subprocess)."""
  out = subprocess.run([sys.executable, "-m", "tests.moe.experts.test_latent"], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=fake_devices(DEVICES, {**os.environ, "PYTHONPATH": REPO,
                                                  "JAX_PLATFORMS": "cpu"}))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["failures"] == [] and res["checked"] == 2 * 8, res  # y, 6 leaves, x


def _expert_parallel() -> None:
  from moejax.moe.dispatch import expert_parallel as epd  # noqa: PLC0415
  from moejax.parallel import mesh as pm  # noqa: PLC0415
  assert jax.device_count() == DEVICES, jax.device_count()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 4, D)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((4, 4, D)), jnp.float32)
  failures, checked = [], 0
  for mode in ("dropless", "capacity"):
    layer = MoELayer(_moe_cfg(mode))
    v = _layer_vars(layer, x, seed=3)

    def objective(p, x, layer=layer, v=v):
      y, _, _ = layer.apply({**v, "params": p}, x)
      return jnp.sum(y * ct), y

    grad = jax.value_and_grad(objective, (0, 1), has_aux=True)
    (_, want_y), want_g = jax.jit(grad)(v["params"], x)
    for shape in ((2, 1, 2),):
      with jax.set_mesh(pm.make_mesh(dict(zip(pm.AXES, shape)))):
        if epd.select(layer.cfg, 16) is None:
          failures.append(f"{mode}/{shape}: the expert-parallel path was not selected")
        (_, y), g = jax.jit(grad)(v["params"], x)
      for name, a, b in [("y", y, want_y)] + [
          (jax.tree_util.keystr(k), a, b) for (k, a), b in
          zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(want_g))]:
        checked += 1
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not np.allclose(a, b, rtol=1e-5, atol=1e-5 * max(np.max(np.abs(b)), 1e-6)):
          failures.append(f"{mode}/{shape}/{name}: {np.max(np.abs(a - b))}")
  print(json.dumps({"failures": failures, "checked": checked}))


if __name__ == "__main__":
  _expert_parallel()
