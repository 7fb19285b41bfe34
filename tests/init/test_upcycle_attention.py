"""Attention upcycling: attention experts copied from the dense attention keep its function."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.validation import validate
from moejax.init.upcycle import attention_to_experts, upcycle_params
from moejax.train import trainer
from tests.conftest import REPO, tiny_config
from tests.init.run_dirs import dense_reference, write_run

TOOL = os.path.join(REPO, "tools", "upcycle.py")
IDS = np.random.default_rng(2).integers(0, 258, (2, 16)).astype(np.int32)


def dense_config():
  c = tiny_config()
  c.moe.enabled = False
  c.model.ffn_hidden = 64
  c.train.batch_size = 4  # the dense run's config: its lm.init compiles once
  c.train.eval_batches = 1
  return c


def random_params(cfg, seed: int) -> dict:
  """Random params with the model's structure (no init compilation: tests stay fast)."""
  ids = np.zeros((1, cfg.train.seq_len), np.int32)
  shapes = jax.eval_shape(lm.make_model(cfg).init, jax.random.key(0), ids)["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [(0.3 * rng.normal(size=x.shape)).astype(np.float32)
                                   for x in leaves])


def moa_config(experts: int, top_k: int, shared_kv: bool, moe: bool = True, **moe_keys):
  c = tiny_config(dispatch="dense", expert_hidden=64, **moe_keys)
  c.moe.enabled = moe
  c.moe.topk.renormalize = True
  c.model.ffn_hidden = 64
  c.model.attn_experts = experts
  c.model.attn_top_k = top_k
  c.model.attn_shared_kv = shared_kv
  c.init.upcycle_attention = True
  return c


@pytest.fixture(scope="module")
def dense():
  return dense_reference(dense_config(), IDS)


def test_attention_to_experts_copies_the_dense_projections():
  rng = np.random.default_rng(0)
  attn = {"w_qkv": rng.normal(size=(8, 3, 2, 4)), "w_out": rng.normal(size=(2, 4, 8))}
  shared = attention_to_experts(attn, 3, shared_kv=True)
  assert sorted(shared) == ["w_kv", "w_out", "w_q"]
  np.testing.assert_array_equal(shared["w_kv"], attn["w_qkv"][:, 1:])
  separate = attention_to_experts(attn, 3, shared_kv=False)
  assert sorted(separate) == ["w_out", "w_qkv"]
  for e in range(3):
    np.testing.assert_array_equal(shared["w_q"][e], attn["w_qkv"][:, 0])
    np.testing.assert_array_equal(shared["w_out"][e], attn["w_out"])
    np.testing.assert_array_equal(separate["w_qkv"][e], attn["w_qkv"])


@pytest.mark.parametrize("experts,top_k,shared_kv,moe,router", [
    (3, 1, True, True, "fresh"),  # one copy with weight 1, MoE FFN (copy) too
    (3, 2, True, False, "fresh"),  # k copies, weights summing to 1; dense FFN kept
    (2, 1, False, False, "zero"),  # separate K/V; zero router: expert 0 with weight 1
    (4, 2, False, True, "fresh"),  # separate K/V, k=2
])
def test_upcycled_attention_logits_equal_dense(dense, experts, top_k, shared_kv, moe, router):
  params, want = dense
  cfg = moa_config(experts, top_k, shared_kv, moe)
  fresh = {"params": random_params(cfg, 3)}  # random routers: any choice of copies works
  up = upcycle_params(params, fresh["params"], cfg, mode="copy", router=router)
  attn = (up["moe_layers"]["block0"] if moe else up["dense_layers"]["block0"])["attn"]
  assert attn["router"].shape[1:] == (cfg.model.d_model, experts)
  if router == "zero":
    assert not np.any(np.asarray(attn["router"]))
  else:
    np.testing.assert_array_equal(
        attn["router"], (fresh["params"]["moe_layers"]["block0"] if moe else
                         fresh["params"]["dense_layers"]["block0"])["attn"]["router"])
  got, aux = lm.apply({**fresh, "params": up}, IDS, cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  assert np.all(np.isfinite(np.asarray(aux["losses"]["attn_load_balance"])))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dense_attn"))
  write_run(path, dense_config(), perturb=0.02)
  return path


def test_tool_upcycles_attention_and_the_run_trains(dense_run, tmp_path):
  spec = importlib.util.spec_from_file_location("upcycle_tool", TOOL)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  cfg = moa_config(2, 2, True, True)  # attention and FFN: 2 copies, weights sum to 1
  cfg.moe.num_experts, cfg.moe.top_k = 2, 2
  cfg.train.batch_size = 4
  cfg.train.eval_batches = 1
  cfg.train.steps = 2
  cfg.train.warmup_steps = 1
  out = str(tmp_path / "up")
  check = tool.upcycle_run(cfg, dense_run, out)
  assert check["upcycle_attention"] and check["attn_experts"] == 2
  assert check["dense_val_loss"] == pytest.approx(check["upcycled_val_loss"], rel=1e-5)
  summary = trainer.train(cfg, out)  # the 2-step smoke: aux losses reach the loss
  assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
  assert summary["params_total"] == lm.param_counts(cfg)["params_total"]
  with open(os.path.join(out, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  logged = [r for r in rows if "train/attn_load_balance" in r]
  assert logged and all(np.isfinite(r["train/attn_z_loss"]) for r in logged)


def test_dense_source_with_attention_experts_is_rejected(dense_run, tmp_path):
  src = moa_config(2, 2, True, moe=False)
  src.init.upcycle_attention = False
  src.train.batch_size = 4
  src.train.eval_batches = 1
  moa_dense = str(tmp_path / "moa_dense")
  os.makedirs(moa_dense)
  trainer.write_config(src, moa_dense)
  os.makedirs(os.path.join(moa_dense, "checkpoints"))
  cfg = moa_config(2, 2, True)
  cfg.init.from_dense = moa_dense
  with pytest.raises(ConfigError, match="has attention experts"):
    validate(cfg)
  cfg.init.from_dense = dense_run
  validate(cfg)


def test_noise_breaks_the_symmetry_of_attention_copies(dense):
  params, _ = dense
  cfg = moa_config(3, 1, True, moe=False)
  up = upcycle_params(params, random_params(cfg, 4), cfg, mode="copy", noise=0.1)
  attn = up["dense_layers"]["block0"]["attn"]
  dense_attn = params["dense_layers"]["block0"]["attn"]
  np.testing.assert_array_equal(attn["w_kv"], dense_attn["w_qkv"][:, :, 1:])  # shared: exact
  for k in ("w_q", "w_out"):
    w = np.asarray(attn[k])
    assert not np.allclose(w[:, 0], w[:, 1])  # [layers, experts, ...]
  rel = np.std(np.asarray(attn["w_q"][:, 0]) - np.asarray(dense_attn["w_qkv"][:, :, 0]))
  assert 0.03 < rel / np.std(np.asarray(dense_attn["w_qkv"][:, :, 0])) < 0.3
