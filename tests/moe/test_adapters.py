"""Adapter experts: allocation, masking, forward reference, frozen-base training."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.init import hooks
from moejax.init.sources import load_run
from moejax.moe import adapters as ad
from moejax.train import data as data_lib
from moejax.train import trainer
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config
from tests.init.run_dirs import write_run


def adapters_group(**kw) -> ml_collections.ConfigDict:
  a = default_config().moe.adapters
  a.enabled = True
  for k, v in kw.items():
    a[k] = v
  return a


@pytest.mark.parametrize("kw,n,want", [
    (dict(allocation="uniform", num_experts=4), 4, [4, 4, 4, 4]),
    (dict(allocation="increasing", num_experts=4, top_k=2), 4, [2, 3, 5, 6]),
    (dict(allocation="decreasing", num_experts=4, top_k=2), 4, [6, 5, 3, 2]),
    (dict(allocation="custom", experts_per_layer="1,2,8", top_k=1), 3, [1, 2, 8]),
    (dict(allocation="increasing", num_experts=2, layers="1,3", top_k=1), 5, [1, 3]),
])
def test_allocation(kw, n, want):
  assert ad.allocate_experts(adapters_group(**kw), n) == want


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), e=st.integers(1, 16),
       rule=st.sampled_from(["uniform", "increasing", "decreasing"]))
def test_allocation_rules_keep_the_total(n, e, rule):
  try:
    counts = ad.allocate_experts(adapters_group(allocation=rule, num_experts=e, top_k=1), n)
  except ValueError as err:  # e.g. e=1 over 3 layers, decreasing: [2, 1, 0]
    assert rule != "uniform" and "gives" in str(err) and "top_k=1" in str(err)
    return
  assert len(counts) == n and sum(counts) == n * e
  steps = np.diff(counts)
  if rule == "increasing":
    assert np.all(steps >= 0)
  elif rule == "decreasing":
    assert np.all(steps <= 0)
  else:
    assert set(counts) == {e}


def test_allocation_errors_name_the_key():
  with pytest.raises(ValueError, match=r"experts_per_layer='2,4' .* 2 entries .* adapts 4"):
    ad.allocate_experts(adapters_group(allocation="custom", experts_per_layer="2,4"), 4)
  with pytest.raises(ValueError, match="moe.adapters.top_k=2"):
    ad.allocate_experts(adapters_group(allocation="increasing", num_experts=1, top_k=2), 3)
  with pytest.raises(ValueError, match="moe.adapters.layers='0,0'"):
    ad.allocate_experts(adapters_group(layers="0,0"), 3)
  with pytest.raises(ValueError, match="moe.adapters.targets='mlp'"):
    ad.parse_targets("mlp")


def base_config() -> ml_collections.ConfigDict:
  c = tiny_config()
  c.moe.enabled = False
  c.train.batch_size = 4
  c.train.eval_batches = 1
  c.train.warmup_steps = 1
  return c


def adapter_config(base_dir: str, **kw) -> ml_collections.ConfigDict:
  c = base_config()
  c.moe.adapters = adapters_group(base=base_dir, **kw)
  return c


def test_list_length_mismatch_is_a_config_error(tmp_path):
  trainer.write_config(base_config(), str(tmp_path))  # validate reads only config.json
  os.makedirs(tmp_path / "checkpoints")
  cfg = adapter_config(str(tmp_path), allocation="custom", experts_per_layer="2,4,6")
  with pytest.raises(ConfigError, match=r"moe.adapters.experts_per_layer='2,4,6'.*adapts 2"):
    validate(cfg)
  cfg.moe.adapters.experts_per_layer = "2,4"
  validate(cfg)
  cfg.model.d_model = 64
  with pytest.raises(ConfigError, match="model.d_model=64"):
    validate(cfg)
  with pytest.raises(ConfigError, match="moe.adapters.base"):
    validate(adapter_config(str(tmp_path / "missing")))


def test_top1_of_several_adapters_needs_an_unnormalised_gate(tmp_path):
  trainer.write_config(base_config(), str(tmp_path))
  os.makedirs(tmp_path / "checkpoints")
  cfg = adapter_config(str(tmp_path), allocation="custom", experts_per_layer="1,3", top_k=1)
  with pytest.raises(ConfigError, match=r"moe.adapters.renormalize=True is invalid: with "
                     r"moe.adapters.top_k=1 of 3 experts the gate would be constantly 1"):
    validate(cfg)
  cfg.moe.adapters.renormalize = False
  validate(cfg)
  cfg.moe.adapters.renormalize = True
  cfg.moe.adapters.experts_per_layer = "1,1"  # one expert per layer: nothing to route
  validate(cfg)


def reference_adapter(z, w_DxE, a_ExDxR, b_ExRxD, valid, k, scale, renormalize=True):
  """NumPy loop: masked softmax, stable top-k, (renormalised) LoRA mixture."""
  out = np.zeros_like(z)
  for t in range(z.shape[0]):
    logits = z[t] @ w_DxE
    logits = np.where(valid, logits, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:k]
    for e in top:
      g = p[e] / p[top].sum() if renormalize else p[e]
      out[t] += g * scale * (z[t] @ a_ExDxR[e]) @ b_ExRxD[e]
  return out


@pytest.mark.parametrize("k,renormalize", [(2, True), (1, False)])
def test_adapter_forward_matches_numpy_reference(k, renormalize):
  e, r, d = 5, 3, 8
  mod = ad.AdapterExperts(e, r, k, alpha=6.0, renormalize=renormalize)
  z = jax.random.normal(jax.random.key(0), (2, 7, d))
  variables = mod.init(jax.random.key(1), z)
  params = dict(variables["params"])
  params["lora_b"] = jax.random.normal(jax.random.key(2), params["lora_b"].shape)
  valid = np.array([True, True, False, True, False])
  y, losses = mod.apply({"params": params, ad.MASK_COLLECTION: {"valid": jnp.asarray(valid)}},
                         z)
  p64 = {n: np.asarray(v, np.float64) for n, v in params.items()}
  want = reference_adapter(np.asarray(z, np.float64).reshape(-1, d), p64["router"],
                           p64["lora_a"], p64["lora_b"], valid, k, 6.0 / r, renormalize)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, d), want, rtol=1e-4, atol=1e-5)
  assert float(losses["adapter_balance"]) >= 1.0 - 1e-5  # >= 1, = 1 at perfect balance
  assert np.isfinite(float(losses["adapter_z_loss"]))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("base"))
  write_run(path, base_config(), perturb=0.02)
  return path


def test_requested_experts_per_layer_are_produced(base_run):
  cfg = adapter_config(base_run, allocation="custom", experts_per_layer="1,3", top_k=1)
  variables = hooks.initial_variables(cfg, lm.init(jax.random.key(0), cfg))
  block = variables["params"]["dense_layers"]["block0"]["ffn_adapter"]
  valid = variables[ad.MASK_COLLECTION]["dense_layers"]["block0"]["ffn_adapter"]["valid"]
  z = jax.random.normal(jax.random.key(4), (512, cfg.model.d_model))
  for layer, want in enumerate([1, 3]):
    assert int(jnp.sum(valid[layer])) == want
    combine, counts, probs, _ = ad.adapter_route(z @ block["router"][layer], valid[layer], 1)
    used = set(np.flatnonzero(np.asarray(counts)).tolist())
    assert used == set(range(want))  # exactly the requested experts, padding never
    assert not np.any(np.asarray(probs)[:, want:])
    np.testing.assert_allclose(jnp.sum(combine, axis=1), 1.0, rtol=1e-6)


def test_training_moves_only_adapters_and_checkpoints_only_them(base_run, tmp_path):
  cfg = adapter_config(base_run, allocation="increasing", num_experts=2, top_k=1,
                       renormalize=False, targets="ffn,attn")
  validate(cfg)
  tx = hooks.wrap_optimizer(cfg, make_optimizer(cfg.train))
  state = trainer.init_state(cfg, tx)
  before = jax.tree.map(np.array, state["params"])
  base, _, _ = load_run(base_run)
  # The base run's parameters were loaded unchanged.
  jax.tree.map(np.testing.assert_array_equal, ad.merge_trainable(before, {}), hooks.merge_base(
      before, base))
  step = trainer.make_train_step(cfg, tx)
  data = data_lib.make_data("", cfg.train.seq_len, cfg.data.val_fraction, cfg.seed)
  it = data.train_iterator(cfg.train.batch_size, cfg.seed)
  for _ in range(3):
    b = next(it)
    state, out = step(state, {"inputs": b["inputs"], "targets": b["targets"]})
  assert np.isfinite(float(out["scalars"]["train/loss"]))
  after = jax.tree.map(np.array, state["params"])
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree_util.tree_flatten_with_path(after)[0]
  for (path, x), (_, y) in zip(flat_b, flat_a):
    if ad.is_trainable_path(path):
      if path[-1].key in ("lora_b", "router"):
        assert not np.array_equal(x, y), jax.tree_util.keystr(path)
    else:
      assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)  # bit-identical
  # Through the trainer: checkpoint = adapter params only; summary counts; resume.
  workdir = str(tmp_path / "run")
  cfg.train.steps = 2
  summary = trainer.train(cfg, workdir)
  saved, _, _ = load_run(workdir)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
  assert paths and all(ad.is_trainable_path(p) for p in paths)
  n_base = ad.count_leaves(base)
  assert summary["params_frozen"] == n_base
  per_expert = 2 * cfg.model.d_model * 4 + cfg.model.d_model  # A, B (rank 4), router column
  assert summary["params_trainable"] == 2 * (1 + 3) * per_expert  # 2 targets, experts 1 + 3
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["moe"]["adapters"]["base"] == base_run
  # Resuming restores the adapters from the run and the base from the base run.
  ckpt = Checkpointer(workdir, 3)
  start, saved_state, _ = ckpt.restore_latest(hooks.checkpoint_view(cfg, state))
  ckpt.close()
  full = hooks.from_checkpoint(cfg, trainer.init_state(cfg, tx), saved_state)
  assert start == 2
  jax.tree.map(np.testing.assert_array_equal, ad.split_trainable(full["params"]), saved)
  jax.tree.map(np.testing.assert_array_equal, hooks.merge_base(full["params"], base),
               full["params"])


def test_adapted_moe_base_starts_equal_to_the_base(tmp_path):
  """LoRA B starts at zero: adapters on an MoE base leave its logits unchanged."""
  base_cfg = tiny_config(dispatch="dense")
  base_cfg.train.batch_size = 4
  base_cfg.train.eval_batches = 1
  run = str(tmp_path / "moe_base")
  write_run(run, base_cfg, perturb=0.02)
  base, colls, _ = load_run(run)
  ids = jax.random.randint(jax.random.key(5), (2, 16), 0, 258)
  want, _ = lm.apply({"params": base, **colls}, ids, base_cfg)
  cfg = base_cfg.copy_and_resolve_references()
  cfg.moe.adapters = adapters_group(base=run, layers="1", num_experts=3, targets="attn,ffn")
  validate(cfg)
  variables = hooks.initial_variables(cfg, lm.init(jax.random.key(0), cfg))
  got, _ = lm.apply(variables, ids, cfg)
  np.testing.assert_array_equal(got, want)
  valid = variables[ad.MASK_COLLECTION]["moe_layers"]["block0"]["attn_adapter"]["valid"]
  assert jnp.sum(valid, axis=1).tolist() == [0, 3]  # only layer 1 is adapted
