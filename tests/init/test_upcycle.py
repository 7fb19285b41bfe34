"""Sparse upcycling: the upcycled MoE computes the dense model's function."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.validation import validate
from moejax.init.sources import load_run
from moejax.init.upcycle import ffn_to_experts, upcycle_params
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from tests.conftest import REPO, tiny_config
from tests.init.run_dirs import dense_reference, write_run

TOOL = os.path.join(REPO, "tools", "upcycle.py")
IDS = jax.random.randint(jax.random.key(2), (2, 16), 0, 258)


def dense_config():
  c = tiny_config()
  c.moe.enabled = False
  c.model.ffn_hidden = 64
  return c


def moe_config(**moe):
  c = tiny_config(dispatch="dense", **moe)
  c.moe.topk.renormalize = True
  return c


@pytest.fixture(scope="module")
def dense():
  return dense_reference(dense_config(), IDS)


@pytest.mark.parametrize("moe", [
    dict(num_experts=4, top_k=2, expert_hidden=64),  # k copies, weights sum to 1
    dict(num_experts=3, top_k=1, expert_hidden=64, every=2),  # one copy with weight 1
])
def test_copy_upcycled_logits_equal_dense(dense, moe):
  params, want = dense
  cfg = moe_config(**moe)
  fresh = lm.init(jax.random.key(3), cfg)  # random router: any choice of copies works
  up = upcycle_params(params, fresh["params"], cfg, mode="copy")
  got, _ = lm.apply({**fresh, "params": up}, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_split_upcycled_with_zero_router_equals_dense(dense):
  """2 slices x 2 copies, k=2: the zero router takes one copy of each slice."""
  params, want = dense
  cfg = moe_config(num_experts=4, top_k=2, expert_hidden=32)
  fresh = lm.init(jax.random.key(3), cfg)
  up = upcycle_params(params, fresh["params"], cfg, mode="split", router="zero")
  assert not np.any(np.asarray(up["moe_layers"]["block0"]["moe"]["router"]["w_gate"]))
  got, _ = lm.apply({**fresh, "params": up}, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def _set_model(cfg, model: dict):
  for key, value in model.items():
    node = cfg.model
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


@pytest.mark.parametrize("model", [
    {"num_kv_heads": 1, "qk_norm": "head", "attn_bias": "qkvo"},  # nested q/k norm params
    {"attention": "mla", "mla.q_lora_rank": 8, "attn_bias": "qkvo"},  # MLA's norms
])
def test_copy_upcycled_logits_equal_dense_with_attention_options(model):
  """The attention, whatever its form (GQA, biases, q/k norms, MLA), is carried over."""
  params, want = dense_reference(_set_model(dense_config(), model), IDS)
  cfg = _set_model(moe_config(num_experts=4, top_k=2, expert_hidden=64), model)
  fresh = lm.init(jax.random.key(3), cfg)
  up = upcycle_params(params, fresh["params"], cfg, mode="copy")
  got, _ = lm.apply({**fresh, "params": up}, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def _zeros(cfg):  # a param tree of cfg's structure, nothing compiled
  shapes = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)


def test_upcycling_refuses_a_different_attention():
  dense = _zeros(_set_model(dense_config(), {"qk_norm": "head"}))
  cfg = moe_config(num_experts=4, top_k=2, expert_hidden=64)
  with pytest.raises(ValueError, match="attn/[qk]_norm: the source has it"):
    upcycle_params(dense, _zeros(cfg), cfg, mode="copy")
  dense = _zeros(_set_model(dense_config(), {"num_kv_heads": 1}))  # w_q, w_kv vs w_qkv
  with pytest.raises(ValueError, match="attn/w_(q|kv): the source has it"):
    upcycle_params(dense, _zeros(cfg), cfg, mode="copy")


def _swiglu(x, g, u, d):
  h = x @ g
  return ((h / (1 + np.exp(-h))) * (x @ u)) @ d


@settings(max_examples=20, deadline=None, derandomize=True)
@given(d=st.integers(1, 6), fe=st.integers(1, 4), g=st.integers(1, 4), reps=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_split_slices_reassemble_the_dense_ffn(d, fe, g, reps, seed):
  """NumPy reference: mean over one copy of each slice = the dense FFN, for any layout."""
  r = np.random.default_rng(seed)
  f = g * fe
  ffn = {"w_gate": r.normal(size=(d, f)), "w_up": r.normal(size=(d, f)),
         "w_down": r.normal(size=(f, d))}
  x = r.normal(size=(5, d))
  ex = ffn_to_experts(ffn, g * reps, fe, "split")
  assert ex["w_gate"].shape == (g * reps, d, fe)
  for copy in range(reps):
    idx = [copy * g + s for s in range(g)]
    y = sum(_swiglu(x, ex["w_gate"][e], ex["w_up"][e], ex["w_down"][e]) for e in idx) / g
    np.testing.assert_allclose(y, _swiglu(x, ffn["w_gate"], ffn["w_up"], ffn["w_down"]),
                               rtol=1e-9, atol=1e-9)


def test_noise_breaks_symmetry_with_the_requested_scale(dense):
  params, _ = dense
  cfg = moe_config(num_experts=4, top_k=2, expert_hidden=64)
  fresh = lm.init(jax.random.key(3), cfg)
  up = upcycle_params(params, fresh["params"], cfg, noise=0.1, rng=jax.random.key(5))
  w = np.asarray(up["moe_layers"]["block0"]["moe"]["experts"]["w_up"][0])  # [E, D, F]
  ref = np.asarray(params["dense_layers"]["block0"]["ffn"]["w_up"][0])
  rel = np.std(w - ref[None], axis=(1, 2)) / np.std(ref)
  np.testing.assert_allclose(rel, 0.1, rtol=0.1)
  assert not np.allclose(w[0], w[1])


def test_bad_shapes_name_the_key():
  ffn = {k: np.zeros((8, 64) if k != "w_down" else (64, 8)) for k in ("w_gate", "w_up", "w_down")}
  with pytest.raises(ValueError, match="moe.expert_hidden=48"):
    ffn_to_experts(ffn, 4, 48, "copy")
  with pytest.raises(ValueError, match="moe.expert_hidden=48"):
    ffn_to_experts(ffn, 4, 48, "split")
  with pytest.raises(ValueError, match="moe.num_experts=3"):
    ffn_to_experts(ffn, 3, 32, "split")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dense"))
  cfg = dense_config()
  cfg.train.batch_size = 4
  cfg.train.eval_batches = 1
  write_run(path, cfg, perturb=0.02)
  return path


def test_config_option_and_errors(dense_run, tmp_path):
  cfg = moe_config(num_experts=4, top_k=2, expert_hidden=64)
  cfg.init.from_dense = dense_run
  validate(cfg)
  state = trainer.init_state(cfg, make_optimizer(cfg.train))
  src, _, _ = load_run(dense_run)
  want = upcycle_params(src, lm.init(jax.random.key(cfg.seed), cfg)["params"], cfg)
  jax.tree.map(np.testing.assert_array_equal, state["params"], want)
  bad = moe_config(num_experts=4, top_k=2, expert_hidden=48)
  bad.init.from_dense = dense_run
  with pytest.raises(ConfigError, match="moe.expert_hidden=48"):
    validate(bad)
  bad = moe_config()
  bad.init.from_dense = str(tmp_path)
  with pytest.raises(ConfigError, match="init.from_dense"):
    validate(bad)
  bad = moe_config()
  bad.init.from_dense = dense_run
  bad.model.d_model = 64
  with pytest.raises(ConfigError, match="model.d_model=64"):
    validate(bad)
  # The attention's form must match the source's (MODEL_KEYS); 0 and its meaning agree.
  for key, value in (("num_kv_heads", 1), ("attention", "mla"), ("attn_bias", "qkv"),
                     ("qk_norm", "full"), ("head_dim", 8)):
    bad = moe_config(num_experts=4, top_k=2, expert_hidden=64)
    bad.init.from_dense = dense_run
    bad.model[key] = value
    with pytest.raises(ConfigError, match=f"model.{key}={value!r}.*init.from_dense"):
      validate(bad)
  same = moe_config(num_experts=4, top_k=2, expert_hidden=64)
  same.init.from_dense = dense_run
  same.model.num_kv_heads, same.model.head_dim = 2, 16  # = num_heads, d_model / num_heads
  validate(same)


def test_tool_writes_a_run_that_continues(dense_run, tmp_path):
  spec = importlib.util.spec_from_file_location("upcycle_tool", TOOL)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  upcycle_run = tool.upcycle_run
  cfg = moe_config(num_experts=4, top_k=2, expert_hidden=64)
  cfg.train.batch_size = 4
  cfg.train.eval_batches = 2
  cfg.train.steps = 2
  cfg.train.warmup_steps = 1
  out = str(tmp_path / "up")
  check = upcycle_run(cfg, dense_run, out)
  with open(os.path.join(out, "upcycle_check.json")) as f:
    assert json.load(f) == check
  assert check["dense_val_loss"] == pytest.approx(check["upcycled_val_loss"], rel=1e-5)
  assert os.path.isdir(os.path.join(out, "checkpoints", "0"))
  with pytest.raises(ValueError, match="already holds a run"):
    upcycle_run(cfg, dense_run, out)
  summary = trainer.train(cfg, out)
  assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
  assert summary["init_source"] == os.path.abspath(dense_run)
