"""Streamed conversion writes what the in-memory path writes: same checkpoint, same shards."""

from __future__ import annotations

import filecmp
import json
import os

import jax
import numpy as np
import pytest

from tests.interop.hf_models import make_model, torch
from moejax import interop
from moejax.init import hooks
from moejax.init.sources import run_arrays, run_config
from moejax.interop import mapping, registry
from moejax.interop.safetensors_io import TensorReader, write_tensors
from moejax.train import trainer
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer

TRAIN = {"train.steps": 2, "train.batch_size": 2, "train.seq_len": 8, "train.warmup_steps": 1,
         "train.eval_every": 2, "train.eval_batches": 1, "train.log_every": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(tmp dir, config, in-memory variables): a DeepSeek-V3 (router bias in moe_state) saved in
  several shards, converted by streaming (run/) and by trainer.write_run (memory/)."""
  root = tmp_path_factory.mktemp("streaming")
  model = make_model("deepseek_v3", num_key_value_heads=4, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                     kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
                     v_head_dim=8, n_group=2, topk_group=1, first_k_dense_replace=1,
                     num_hidden_layers=3)
  model.save_pretrained(str(root / "hf"), max_shard_size=60_000)
  interop.from_hf(str(root / "hf"), str(root / "run"), TRAIN)
  cfg, variables, _ = interop.load_hf(str(root / "hf"), TRAIN)
  trainer.write_run(cfg, variables, str(root / "memory"))
  return root, cfg, variables


def _restore(cfg, run_dir):
  tx = hooks.wrap_optimizer(cfg, make_optimizer(cfg.train))
  return Checkpointer(run_dir, 3).restore(0, trainer.init_state(cfg, tx))


def test_streamed_checkpoint_restores_the_in_memory_state(runs):
  root, cfg, variables = runs
  assert len([f for f in os.listdir(root / "hf") if f.endswith(".safetensors")]) > 1
  got, got_data = _restore(cfg, str(root / "run"))
  want, want_data = _restore(cfg, str(root / "memory"))
  assert got_data == want_data
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  # ... which hold exactly the variables of mapping.from_hf, moe_state included
  assert "moe_state" in variables
  mine = {"params": got["params"], **got["collections"]}
  assert jax.tree.structure(mine) == jax.tree.structure(variables)
  for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(x), y)
  # same format: the pytree metadata and the recorded handlers are those of the trainer's save
  for name in ("state/_METADATA", "_CHECKPOINT_METADATA"):
    a, b = (json.load(open(root / r / "checkpoints" / "0" / name)) for r in ("run", "memory"))
    for volatile in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
      a.pop(volatile, None), b.pop(volatile, None)
    assert a == b, name
  for name in ("config.json", "checkpoints/0/data/metadata"):
    assert filecmp.cmp(root / "run" / name, root / "memory" / name, shallow=False), name
  # stacked leaves are stored one layer per chunk (so they are written and read per layer)
  arrays, _ = run_arrays(str(root / "run"))
  w = arrays.metadata(("params", "moe_layers", "block0", "moe", "experts", "w_gate"))
  assert w.storage.chunk_shape == (1,) + tuple(w.shape[1:])


def test_training_resumes_from_it_as_from_the_in_memory_run(runs):
  root, cfg, _ = runs
  losses = {}
  for r in ("run", "memory"):
    summary = trainer.train(run_config(str(root / r)), str(root / r))
    assert summary["steps"] == 2
    with open(root / r / "metrics.jsonl") as f:
      losses[r] = {m["step"]: m["train/loss"] for m in map(json.loads, f) if "train/loss" in m}
  assert sorted(losses["run"]) == [1, 2] and losses["run"] == losses["memory"]


@pytest.mark.parametrize("source", ["run", "memory"])  # one chunk per layer / per leaf
def test_export_writes_the_in_memory_shards(runs, tmp_path, source):
  root, cfg, variables = runs
  run_dir = str(root / source)
  out, want = str(tmp_path / "out"), str(tmp_path / "want")
  interop.to_hf(run_dir, out, step=0, max_shard_bytes=40_000)
  with open(os.path.join(out, "config.json")) as f:
    hf_dict = json.load(f)
  groups = registry.get("deepseek_v3").module.tensors(cfg, hf_dict)
  write_tensors(want, mapping.to_hf(cfg, groups, variables), 40_000)
  files = sorted(os.listdir(want))
  assert len(files) > 2 and sorted(os.listdir(out)) == sorted(files + ["config.json"])
  for name in files:
    assert filecmp.cmp(os.path.join(out, name), os.path.join(want, name), shallow=False), name


def test_reader_converts_every_float_dtype_exactly(tmp_path):
  from safetensors.torch import save_file  # noqa: PLC0415

  g = torch.Generator().manual_seed(0)
  x = torch.randn(3, 5, generator=g)
  tensors = {"bf16": x.to(torch.bfloat16), "f16": x.to(torch.float16), "f32": x,
             "f8": x.to(torch.float8_e4m3fn), "i64": torch.arange(6).reshape(2, 3)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with TensorReader(str(tmp_path)) as r:
    for name, t in tensors.items():
      got = r.get(name)
      assert got.dtype == np.float32 and r.shape(name) == tuple(t.shape)
      np.testing.assert_array_equal(got, t.to(torch.float32).numpy(), err_msg=name)
