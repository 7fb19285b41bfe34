"""Cross-layer expert pools (moejax/moe/pool.py): UniPool's global pool, ReXMoE's layer window.

References written apart from the implementation: the window rule by brute
force over every start; the MoE layer against a per-token NumPy loop over
the pool's weights; the whole model against the ordinary per-layer MoE model
whose layer i holds copies of the pool experts layer i may choose (same
router weights), including gradients (the pool's = the sum over layers of
the copies'). Expert parallelism on 4 fake CPU devices runs in a subprocess.
"""

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
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import layout
from moejax import model as lm
from moejax.checks import ConfigError
from moejax.moe import pool as pool_lib
from moejax.moe.experts import ExpertWeights, get_family
from moejax.moe.layer import EXPERT_MAP, MoELayer
from moejax.validation import validate
from tests.conftest import REPO, fake_devices, tiny_config

E, K, D, F = 4, 2, 16, 16  # experts per layer (window), top_k, d_model, expert_hidden


def pool_config(kind: str, *, size: int = 6, window: int = 2, layers: int = 3, **moe):
  """3 MoE layers, d_model 16, E=4 per layer (window) or a pool of `size` (global)."""
  c = tiny_config(num_experts=E, top_k=K, expert_hidden=F)
  c.model.d_model, c.model.num_layers, c.model.ffn_hidden = D, layers, 32
  c.train.seq_len, c.train.batch_size = 8, 4
  c.moe.pool.kind = kind
  if kind == "global":
    c.moe.pool.size = size
  elif kind == "window":
    c.moe.pool.window = window
  for key, v in moe.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return c


def brute_window(i: int, n: int, w: int) -> int:
  """The start of layer i's window: among the w-layer windows inside [0, n) that hold i,
  the one whose centre is nearest i (for even w: the one reaching further after i)."""
  starts = [s for s in range(n - w + 1) if s <= i < s + w]
  return min(starts, key=lambda s: (abs(s + (w - 1) / 2 - i), -s))


def reference_map(cfg, p: int) -> np.ndarray:
  """[R] pool experts MoE layer p may choose, from the brute-force window."""
  if cfg.moe.pool.kind == "global":
    return np.arange(cfg.moe.pool.size)
  n = layout.layer_plan(cfg)[1]
  s = brute_window(p, n, cfg.moe.pool.window)
  return np.arange(s * E, (s + cfg.moe.pool.window) * E)


# --------------------------------------------------------------------------- the window rule


def test_window_rule_by_enumeration():
  for n in range(1, 7):
    for w in range(1, n + 1):
      for i in range(n):
        s = pool_lib.window_start(i, n, w)
        assert s == brute_window(i, n, w), (n, w, i)
        assert int(pool_lib.window_start(jnp.int32(i), n, w)) == s  # traced form agrees
        moe = ml_collections.ConfigDict({"num_experts": E, "pool": {"kind": "window",
                                                                    "window": w}})
        np.testing.assert_array_equal(pool_lib.layer_map(i, moe, n * E),
                                      np.arange(s * E, (s + w) * E))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.data())
def test_window_is_inside_the_stack_and_holds_its_layer(n, data):
  w = data.draw(st.integers(1, n))
  i = data.draw(st.integers(0, n - 1))
  s = pool_lib.window_start(i, n, w)
  assert 0 <= s and s + w <= n and s <= i < s + w
  if (w - 1) // 2 <= i <= n - 1 - w // 2:  # away from the ends: centred
    assert (i - s, s + w - 1 - i) == ((w - 1) // 2, w // 2)


def test_model_maps_follow_the_window():
  cfg = pool_config("window", window=2, layers=4)  # windows [0,1], [1,2], [2,3], [2,3]
  v = lm.init(jax.random.key(0), cfg)
  got = np.asarray(layout.get(v[EXPERT_MAP], layout.MOE_PATH)["map"])
  want = np.stack([reference_map(cfg, p) for p in range(4)])
  np.testing.assert_array_equal(got, want)
  assert [int(r[0]) // E for r in got] == [0, 1, 2, 2]


# --------------------------------------------------------------------------- the MoE layer


def swiglu_np(x_D, w, e):
  g, u = x_D @ w["w_gate"][e], x_D @ w["w_up"][e]
  return ((g / (1.0 + np.exp(-g))) * u) @ w["w_down"][e]


@pytest.mark.parametrize("kind,dispatch", [("window", "dropless"), ("global", "dense")])
def test_layer_matches_a_per_token_loop_over_the_pool(kind, dispatch):
  cfg = pool_config(kind, dispatch=dispatch)
  moe = ml_collections.FrozenConfigDict(cfg.moe)
  n, p_size = 3, pool_lib.pool_size(cfg)
  rng = np.random.default_rng(0)
  family = get_family(cfg.moe)
  w = {name: rng.standard_normal(leaf.shape(p_size, D, F)).astype(np.float32) * 0.3
       for name, leaf in family.leaves().items()}
  pool = ExpertWeights(w={k: jnp.asarray(v) for k, v in w.items()}, family=family,
                       dtype=jnp.float32)
  x = rng.standard_normal((2, 8, D)).astype(np.float32)
  layer = MoELayer(moe)
  for i in range(n):
    v = layer.init(jax.random.key(i), jnp.asarray(x), pool=pool, moe_layer=i)
    y, _, _ = layer.apply(v, jnp.asarray(x), pool=pool, moe_layer=i)
    w_gate = np.asarray(v["params"]["router"]["w_gate"], np.float64)
    choices = reference_map(cfg, i)
    want = np.zeros((16, D))
    for t, x_D in enumerate(x.reshape(16, D).astype(np.float64)):
      logits = x_D @ w_gate
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      top = np.argsort(-probs)[:K]
      for r in top:  # renormalised top-k weights, choice r -> pool expert choices[r]
        want[t] += probs[r] / probs[top].sum() * swiglu_np(x_D, w, choices[r])
    np.testing.assert_allclose(np.asarray(y).reshape(16, D), want, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------------- the model


def reference_params(cfg, params: dict) -> tuple[ml_collections.ConfigDict, dict]:
  """The ordinary per-layer MoE config and params computing what the pool model computes:
  MoE layer p holds copies of the pool experts of reference_map(p) (its R choices)."""
  plain = ml_collections.ConfigDict(cfg.to_dict())
  plain.moe.num_experts = pool_lib.num_choices(cfg.moe)
  plain.moe.pool.kind, plain.moe.pool.size, plain.moe.pool.window = "none", 0, 0
  n = layout.layer_plan(cfg)[1]
  maps = np.stack([reference_map(cfg, p) for p in range(n)])
  pool_w = params[pool_lib.MODULE][layout.EXPERTS]
  out = {k: v for k, v in params.items() if k != pool_lib.MODULE}
  experts = {k: jnp.asarray(np.asarray(v)[maps]) for k, v in pool_w.items()}
  out = layout.replace(out, layout.EXPERTS_PATH, experts)
  return plain, out, maps


RICH = [  # dense layers before / between the MoE layers, shared experts, another router
    ("window", {"model.num_layers": 4, "moe.first_dense_layers": 1, "moe.num_shared_experts": 1}),
    ("global", {"model.num_layers": 4, "moe.every": 2, "moe.router": "sigmoid_bias"}),
]
CASES = [("window", {}), ("global", {}), *RICH]


@pytest.mark.parametrize("kind,extra", RICH)
def test_model_and_gradients_equal_the_per_layer_reference(kind, extra):
  cfg = pool_config(kind, **extra)
  validate(cfg)
  v = lm.init(jax.random.key(0), cfg)
  plain, plain_params, maps = reference_params(cfg, v["params"])
  validate(plain)
  ref_v = {k: x for k, x in v.items() if k not in ("params", EXPERT_MAP)}
  ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 256)
  target = jax.random.normal(jax.random.key(2), (4, 8, cfg.model.vocab_size))

  def loss(params, c, rest):
    logits, _ = lm.apply({**rest, "params": params}, ids, c)
    return jnp.sum(logits * target), logits

  (_, got), g = jax.value_and_grad(loss, has_aux=True)(
      v["params"], cfg, {k: x for k, x in v.items() if k != "params"})
  (_, want), g_ref = jax.value_and_grad(loss, has_aux=True)(plain_params, plain, ref_v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  g_pool = g[pool_lib.MODULE][layout.EXPERTS]
  g_layers = layout.get(g_ref, layout.EXPERTS_PATH)
  for name, gp in g_pool.items():
    per_layer = np.asarray(g_layers[name])  # [N, R, ...]: each layer's own gradient
    summed = np.zeros(gp.shape, np.float64)
    for p in range(maps.shape[0]):
      assert np.abs(per_layer[p]).max() > 0, (name, p)  # every layer sends gradient
      np.add.at(summed, maps[p], per_layer[p])
    np.testing.assert_allclose(np.asarray(gp), summed, rtol=1e-4,
                               atol=1e-5 * np.abs(summed).max())
  # Everything outside the experts gets the same gradient as in the reference.
  for path in (("embed",), layout.ROUTER_PATH):
    for a, b in zip(jax.tree.leaves(layout.get(g, path)), jax.tree.leaves(layout.get(g_ref, path))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_causal():
  cfg = pool_config("window")
  v = lm.init(jax.random.key(1), cfg)
  ids = jax.random.randint(jax.random.key(0), (4, 8), 0, 256)
  t = 4
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  a, b = lm.apply(v, ids, cfg)[0], lm.apply(v, ids2, cfg)[0]
  np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("kind,extra", CASES)
def test_param_counts_match_the_tree(kind, extra):
  cfg = pool_config(kind, **extra)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  expert = 3 * D * F
  pool_params = sum(x.size for x in jax.tree.leaves(p[pool_lib.MODULE]))
  assert pool_params == pool_lib.pool_size(cfg) * expert  # the pool, counted once
  n = layout.layer_plan(cfg)[1]  # active: every non-pool weight + top_k experts per MoE layer
  assert counts["params_active"] == counts["params_total"] - pool_params + n * K * expert


def test_pool_leaves_are_sharded_over_the_expert_axis():
  from moejax.parallel import mesh as pm  # noqa: PLC0415
  cfg = pool_config("global")
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  specs = pm.param_specs(p, {"data": 1, "fsdp": 1, "expert": 2}, pm.expert_leaves(cfg))
  pool_specs = specs[pool_lib.MODULE][layout.EXPERTS]
  leaves = get_family(cfg.moe).leaves()
  for name, spec in pool_specs.items():
    assert spec[leaves[name].expert_axis] == "expert", (name, spec)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind,extra,key,fragment", [
    ("window", {"moe.pool.window": 4}, "moe.pool.window=4", "at most the 3 MoE layers"),
    ("window", {"moe.pool.window": 0}, "moe.pool.window=0", "integer >= 1"),
    ("window", {"moe.pool.window": -1}, "moe.pool.window=-1", "non-negative"),
    ("global", {"moe.pool.size": 0}, "moe.pool.size=0", "positive integer"),
    ("global", {"parallel.expert": 4}, "parallel.expert=4", "moe.pool.size=6"),
    ("window", {"moe.num_experts": 3, "parallel.expert": 2}, "parallel.expert=2",
     "window pool's experts"),
    ("global", {"moe.pool.size": 1}, "moe.top_k=2", "the 1 experts each MoE layer"),
    ("window", {"moe.pool.window": 1, "moe.top_k": 5}, "moe.top_k=5", "the 4 experts"),
    ("window", {"moe.router": "soft"}, "moe.pool.kind='window'", "needs moe.router in"),
    ("global", {"moe.router": "expert_choice"}, "moe.pool.kind='global'",
     "needs moe.router in"),
    ("global", {"moe.topk.copies": 2}, "moe.pool.kind='global'", "moe.topk.copies=1"),
    ("nonsense", {}, "moe.pool.kind='nonsense'", "allowed: ['none', 'global', 'window']"),
    ("window", {"moe.pool.size": 4}, "moe.pool.size=4", "must be 0 unless"),
    ("none", {"moe.pool.window": 2}, "moe.pool.window=2", "must be 0 unless"),
    ("global", {"moe.num_router_experts": 8}, "moe.num_router_experts=8", "must be 0"),
    ("global", {"moe.quant.scheme": "sym", "moe.quant.experts8": 4}, "moe.quant.scheme='sym'",
     "must be 'none'"),
    ("global", {"moe.expert": "latent", "moe.latent.rank": 4}, "moe.expert='latent'",
     "shared by the experts of one layer"),
])
def test_bad_pool_configs_are_rejected_naming_the_key(kind, extra, key, fragment):
  cfg = pool_config(kind, **extra)
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  assert key in str(e.value) and fragment in str(e.value), str(e.value)


def test_per_layer_tools_refuse_a_pool_naming_the_key(tmp_path):
  from moejax.analysis import routing  # noqa: PLC0415
  from moejax.compress.method import check_routed_experts  # noqa: PLC0415
  from moejax.init import checks as init_checks  # noqa: PLC0415
  from moejax.interop import decoder  # noqa: PLC0415
  cfg = pool_config("window")
  with pytest.raises(ValueError, match=r"moe.pool.kind='window'.*prune"):
    check_routed_experts(cfg, "prune")
  assert any("moe.pool.kind='window'" in r for r in decoder.export_reasons(cfg))
  from moejax.inference import trace  # noqa: PLC0415
  model = routing.Model(cfg=cfg, variables=lm.init(jax.random.key(0), cfg), step=0)
  captured = routing.capture(model, np.zeros((1, 8), np.int32))  # over the pool's experts
  assert captured.num_experts == pool_lib.pool_size(cfg) == 12
  with pytest.raises(ValueError, match=r"moe.pool.kind='window'.*routing trace"):
    trace.capture(model, np.zeros((1, 8), np.int32))
  run = tmp_path / "dense"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({}))
  cfg.init.from_dense = str(run)
  with pytest.raises(ConfigError, match=r"moe.pool.kind='window'.*upcycling"):
    init_checks.check_config(cfg)


# --------------------------------------------------------------------------- expert parallelism

DEVICES = 4


def test_expert_parallel_on_4_devices_equals_one_device():
  out = subprocess.run([sys.executable, "-m", "tests.moe.test_expert_pool"], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env=fake_devices(DEVICES, {**os.environ, "PYTHONPATH": REPO,
                                                  "JAX_PLATFORMS": "cpu"}))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"checked": ["window"]}


def _expert_parallel() -> None:
  """Logits and gradients on a (data=2, expert=2) mesh vs the same process without one (the
  window pool: layers route into experts held by different shards)."""
  from moejax.parallel import mesh as pm  # noqa: PLC0415
  assert jax.device_count() == DEVICES, jax.device_count()
  checked = []
  for kind in ("window",):
    cfg = pool_config(kind, **{"parallel.expert": 2, "parallel.data": 2})
    validate(cfg)
    v = lm.init(jax.random.key(0), cfg)
    ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 256)
    model = lm.make_model(cfg)

    def run(params, rest):
      def loss(p):
        logits, aux = model.apply({**rest, "params": p}, ids)
        return jnp.sum(logits ** 2) * 1e-3 + sum(jnp.sum(a) for a in aux["losses"].values()), logits
      return jax.value_and_grad(loss, has_aux=True)(params)

    rest = {k: x for k, x in v.items() if k != "params"}
    (_, want), g_want = jax.jit(run)(v["params"], rest)
    mesh = pm.make_mesh({"data": 2, "fsdp": 1, "expert": 2})
    with jax.set_mesh(mesh):
      fn = jax.jit(lambda p, r: run(p, r))
      hlo = fn.lower(v["params"], rest).as_text()
      assert "all_to_all" in hlo or "all-to-all" in hlo, "no expert-parallel exchange"
      (_, got), g_got = fn(v["params"], rest)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
      b = np.asarray(b)
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    checked.append(kind)
  print(json.dumps({"checked": checked}))


if __name__ == "__main__":
  _expert_parallel()
