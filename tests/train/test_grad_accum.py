"""Gradient accumulation and global-batch balancing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from tests.conftest import tiny_config


def _one_step(balance: str, accum: int):
  cfg = tiny_config()
  cfg.moe.balance = balance
  cfg.moe.aux_loss_weight = 1.0  # make balancing matter for the gradient
  cfg.train.grad_accum_steps = accum
  cfg.train.grad_clip = 0.0
  tx = make_optimizer(cfg.train)
  state = trainer.init_state(cfg, tx)
  ids = jax.random.randint(jax.random.key(5), (8, 16), 0, 256)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1)}
  step = trainer.make_train_step(cfg, tx)
  state, out = step(state, batch)  # lr is 0 at step 0 (warmup): take a second step
  state, out = step(state, batch)
  return jax.device_get(state["params"]), jax.device_get(out["scalars"])


def test_global_batch_loss_with_accumulation_equals_one_batch():
  params1, m1 = _one_step("global_batch", 1)
  params4, m4 = _one_step("global_batch", 4)
  np.testing.assert_allclose(m4["train/global_balance"], m1["train/global_balance"], rtol=1e-5)
  np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["train/total_loss"], m1["train/total_loss"], rtol=1e-5)
  # Same loss, so the same gradients (up to float reassociation) and params.
  np.testing.assert_allclose(m4["train/grad_norm"], m1["train/grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_switch_loss_is_per_micro_batch():
  """The per-micro-batch switch loss is a different quantity: it must differ."""
  _, m1 = _one_step("switch", 1)
  _, m4 = _one_step("switch", 4)
  np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-5)
  assert m4["train/load_balance"] > m1["train/load_balance"] + 1e-3


def test_sequence_balance_matches_reference():
  from moejax.moe.losses import sequence_load_balance  # noqa: PLC0415
  rng = np.random.default_rng(0)
  b, l, e = 3, 5, 4
  probs = rng.dirichlet(np.ones(e), size=b * l)
  counts = rng.integers(0, 4, size=(b, e)).astype(np.float64)
  counts[1] = 0.0  # a sequence with no valid assignment contributes 0
  ref = 0.0
  for i in range(b):
    f = counts[i] / max(counts[i].sum(), 1.0)
    p = probs[i * l:(i + 1) * l].mean(axis=0)
    ref += e * np.sum(f * p) / b
  got = sequence_load_balance(jnp.asarray(probs, jnp.float32),
                              jnp.asarray(counts, jnp.float32), b)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_bad_balance_and_accum_values():
  from moejax.checks import ConfigError  # noqa: PLC0415
  from moejax.validation import validate  # noqa: PLC0415
  cfg = tiny_config()
  cfg.moe.balance = "switch,global"
  with pytest.raises(ConfigError, match="moe.balance.*'global'.*global_batch"):
    validate(cfg)
  cfg = tiny_config()
  cfg.train.grad_accum_steps = 3
  with pytest.raises(ConfigError, match="train.grad_accum_steps=3.*train.batch_size=8"):
    validate(cfg)
