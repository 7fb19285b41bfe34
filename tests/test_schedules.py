"""Training-time schedules: values against a per-step Python reference, the config checks,
scheduled loss weights, what the trainer logs and passes, and exact resumption."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import aux_losses as aux_lib
from moejax import schedules
from moejax.checks import ConfigError
from moejax.model.transformer import aux_losses as declared_aux_losses
from moejax.moe.routers.smoe_dropout import K_KEY
from moejax.schedules import Schedule
from moejax.train import trainer
from moejax.validation import validate
from tests.conftest import tiny_config


def _reference(s: Schedule, n: int) -> float:
  """The documented value at step n, in float64, one case at a time."""
  if n <= s.begin:
    p = 0.0 if (s.stop > s.begin or n < s.begin) else 1.0
  elif n >= s.stop:
    p = 1.0
  else:
    p = (n - s.begin) / (s.stop - s.begin)
  if s.shape == "step":
    return s.end if n >= s.stop else s.start
  if s.shape == "linear":
    return s.start + (s.end - s.start) * p
  if s.shape == "cosine":
    return s.end + (s.start - s.end) * 0.5 * (1 + math.cos(math.pi * p))
  return s.start * (s.end / s.start) ** p  # exponential


@settings(max_examples=80, deadline=None, derandomize=True)
@given(shape=st.sampled_from(schedules.SHAPES), begin=st.integers(0, 50),
       width=st.integers(0, 50), n=st.integers(0, 120),
       start=st.floats(0.05, 10.0), end=st.floats(0.05, 10.0))
def test_values_match_the_reference(shape, begin, width, n, start, end):
  s = Schedule(start, end, begin, begin + width, shape)
  s.check("s.")
  got = float(s(jnp.int32(n)))
  np.testing.assert_allclose(got, _reference(s, n), rtol=2e-5, atol=1e-6)
  lo, hi = min(start, end), max(start, end)
  assert lo * (1 - 1e-5) <= got <= hi * (1 + 1e-5)  # never outside [start, end]


def test_endpoints_and_a_few_values_by_hand():
  lin = Schedule(1.0, 3.0, 10, 20)
  assert [float(lin(n)) for n in (0, 10, 15, 20, 99)] == [1.0, 1.0, 2.0, 3.0, 3.0]
  cos = Schedule(2.0, 0.0, 0, 4, "cosine")
  np.testing.assert_allclose([float(cos(n)) for n in (0, 2, 4)], [2.0, 1.0, 0.0], atol=1e-6)
  exp = Schedule(2.0, 0.5, 0, 2, "exponential")
  np.testing.assert_allclose([float(exp(n)) for n in (0, 1, 2)], [2.0, 1.0, 0.5], rtol=1e-6)
  step = Schedule(0.0, 1.0, 5, 5, "step")
  assert [float(step(n)) for n in (4, 5, 6)] == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("sched,key,words", [
    (Schedule(1.0, 2.0, 10, 5), "s.stop", "end before it starts"),
    (Schedule(1.0, 2.0, -1, 5), "s.begin", "non-negative integer"),
    (Schedule(1.0, 0.0, 0, 5, "exponential"), "s.shape", "> 0"),
    (Schedule(1.0, 2.0, 0, 5, "sigmoid"), "s.shape", "allowed"),
    (Schedule(float("nan"), 2.0, 0, 5), "s.start", "finite"),
])
def test_bad_schedules_are_rejected(sched, key, words):
  with pytest.raises(ConfigError, match=rf"{key}=.*{words}"):
    sched.check("s.")


def _entry(**kw) -> ml_collections.ConfigDict:
  e = schedules.entry()
  e.update({"key": "moe.aux_loss_weight", "start": 0.0, "end": 0.1, "begin": 0, "stop": 4,
            **kw})
  return e


def test_config_entries_are_checked():
  cfg = tiny_config()
  cfg.schedules.warm = _entry()
  validate(cfg)
  assert schedules.all_schedules(cfg) == {
      "moe.aux_loss_weight": Schedule(0.0, 0.1, 0, 4, "linear")}
  for kw, key, words in [({"key": "moe.top_k"}, "schedules.warm.key", "loss weights"),
                         ({"stop": 2, "begin": 3}, "schedules.warm.stop", "before it starts"),
                         ({"shape": "exp"}, "schedules.warm.shape", "allowed")]:
    bad = tiny_config()
    bad.schedules.warm = _entry(**kw)
    with pytest.raises(ConfigError, match=rf"{key}=.*{words}"):
      validate(bad)
  bad = tiny_config()
  bad.schedules.warm = _entry()
  bad.schedules.warm.extra = 1
  with pytest.raises(ConfigError, match="schedules.warm has keys"):
    validate(bad)
  bad = tiny_config()
  bad.schedules.a, bad.schedules.b = _entry(), _entry()
  with pytest.raises(ConfigError, match="schedules.b.key=.*already driven by schedules.a"):
    validate(bad)


def test_a_scheduled_weight_replaces_the_config_value():
  cfg = tiny_config()
  specs = declared_aux_losses(cfg)
  losses = {"load_balance": jnp.asarray([1.0, 3.0]), "z_loss": jnp.asarray([2.0, 2.0])}
  plain = float(aux_lib.total(losses, specs, cfg))
  assert plain == pytest.approx(cfg.moe.aux_loss_weight * 4 + cfg.moe.z_loss_weight * 4)
  got = float(aux_lib.total(losses, specs, cfg, {"moe.aux_loss_weight": jnp.float32(0.5)}))
  assert got == pytest.approx(0.5 * 4 + cfg.moe.z_loss_weight * 4)


# --------------------------------------------------------------------------- the trainer


def _cfg() -> ml_collections.ConfigDict:
  """SMoE-Dropout's k ramp (1 -> 4 over steps 0..4) plus a balance-weight warmup, with
  micro-batches and global-batch balancing (the counting pre-pass sees the schedule)."""
  cfg = tiny_config(router="smoe_dropout", top_k=4, balance="global_batch")
  cfg.moe.smoe_dropout.update(k_start=1, k_end=4, ramp_begin=0, ramp_stop=4)
  cfg.schedules.warm = _entry(start=0.0, end=0.02, begin=1, stop=5)
  cfg.train.update(steps=6, log_every=1, eval_every=6, checkpoint_every=3, eval_batches=1,
                   grad_accum_steps=2)
  return cfg


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"train/loss"' in line]


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
  cfg = _cfg()
  workdir = str(tmp_path_factory.mktemp("scheduled"))
  return cfg, workdir, trainer.train(cfg, workdir)


def test_the_trainer_steps_every_schedule(scheduled_run):
  cfg, workdir, _ = scheduled_run
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  scheds = schedules.all_schedules(cfg)
  for r in rows:
    n = r["step"] - 1  # logged after the update of step n -> n + 1, computed at n
    for key, s in scheds.items():
      assert r[f"schedule/{key}"] == pytest.approx(_reference(s, n), rel=1e-6), (key, n)
    # The router used round(k_n) experts per token in every layer.
    k = min(max(math.floor(_reference(scheds[K_KEY], n) + 0.5), 1), 4)
    for layer in (0, 1):
      assert r[f"moe/layer{layer}/experts_per_token"] == pytest.approx(k), (n, layer)


def test_resume_restores_the_schedules_exactly(scheduled_run, tmp_path):
  cfg, full_dir, summary = scheduled_run
  workdir = str(tmp_path / "run")
  shutil.copytree(full_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # killed after step 3's
  os.remove(os.path.join(workdir, "summary.json"))
  resumed = trainer.train(cfg, workdir)
  full_rows = {r["step"]: r for r in _rows(full_dir)}
  for r in _rows(workdir):
    want = full_rows[r["step"]]
    for key in [k for k in want if k.startswith(("schedule/", "train/loss", "train/total"))]:
      assert r[key] == want[key], (r["step"], key)  # bit for bit
  assert resumed["final_val_loss"] == summary["final_val_loss"]
