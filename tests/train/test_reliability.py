"""Runs that survive: SIGKILL/SIGTERM and resume, bad checkpoints, non-finite steps."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.train import trainer
from moejax.train.checkpoint import Checkpointer, IncompatibleCheckpoint
from moejax.train.optimizer import make_optimizer
from tests.conftest import REPO, TINY_FLAGS, tiny_config

TINY = TINY_FLAGS + ["--config.train.eval_every=1000", "--config.train.log_every=1"]
STEPS = 24


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f]
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == sorted(set(steps)), "duplicated or unordered steps"
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _start(workdir, steps, checkpoint_every):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments", "--workdir", workdir, *TINY,
       f"--config.train.steps={steps}", f"--config.train.checkpoint_every={checkpoint_every}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(ln).get("step", 0) >= step for ln in f if ln.strip()):
          return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  p = _start(workdir, STEPS, 3)
  assert p.wait(timeout=300) == 0, p.stdout.read()
  return _losses(workdir)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_step_then_resume_matches(reference, tmp_path, seed):
  workdir = str(tmp_path / "run")
  kill_at = random.Random(seed).randint(4, STEPS - 4)
  p = _start(workdir, STEPS, 3)
  _wait_for_step(workdir, kill_at, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p = _start(workdir, STEPS, 3)
  assert p.wait(timeout=300) == 0, p.stdout.read()
  assert _losses(workdir) == reference  # bit for bit, no duplicated or missing step


def _wait_for_file(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, f"{path} not written"
    time.sleep(0.01)


def test_sigterm_checkpoints_and_exits_zero(reference, tmp_path):
  workdir = str(tmp_path / "run")
  p = _start(workdir, STEPS, 1000)  # no periodic checkpoint before the signal
  # config.json is written once the handler is installed and before the first
  # step compiles: a signal sent then always lands before the run can finish
  # (waiting for a logged step raced the remaining steps on a loaded machine).
  _wait_for_file(os.path.join(workdir, "config.json"), p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 0, out
  assert "after step " in out, out
  stopped = int(out.split("after step ")[1].split(";")[0])
  assert 1 <= stopped < STEPS
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  p = _start(workdir, STEPS, 1000)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0 and f"checkpoints/{stopped}" in out, out
  assert _losses(workdir) == reference


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  cfg = tiny_config()
  workdir = str(tmp_path_factory.mktemp("finished"))
  trainer.train(cfg, workdir)
  return cfg, workdir


def test_truncated_newest_checkpoint_falls_back(finished, tmp_path, capsys):
  cfg, src = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(src, workdir)
  newest = os.path.join(workdir, "checkpoints", "30", "state")
  for root, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(0, os.path.getsize(f.name) // 3))
  tx = make_optimizer(cfg.train)
  step, state, data_state = Checkpointer(workdir, 3).restore_latest(
      trainer.init_state(cfg, tx))
  assert step == 20 and data_state is not None
  assert "checkpoint step 30" in capsys.readouterr().out
  assert int(state["step"]) == 20


def test_incompatible_checkpoint_names_parameter(finished):
  cfg, workdir = finished
  other = tiny_config()
  other.moe.expert_hidden = 48
  state = trainer.init_state(other, make_optimizer(other.train))
  with pytest.raises(IncompatibleCheckpoint, match=r"moe/experts/w_down has shape \(2, 4, 32, 32\)"):
    Checkpointer(workdir, 3).restore_latest(state)


def test_workdir_with_other_config_is_refused(finished):
  cfg, workdir = finished
  other = tiny_config()
  other.model.d_model = 64
  with pytest.raises(ValueError, match="different config.*model.d_model"):
    trainer.train(other, workdir)
  longer = tiny_config()
  longer.train.steps = 30  # resumable keys may change: not refused
  assert trainer.train(longer, workdir)["steps"] == 30


def test_nonfinite_step_is_skipped_exactly():
  cfg = tiny_config()
  tx = make_optimizer(cfg.train)
  step = trainer.make_train_step(cfg, tx)
  ids = jnp.ones((8, 16), jnp.int32)
  good = {"inputs": ids, "targets": ids, "weights": jnp.ones((8, 16))}
  bad = {**good, "weights": good["weights"].at[0, 0].set(jnp.nan)}
  state, _ = step(trainer.init_state(cfg, tx), good)
  state, _ = step(state, good)
  before = jax.device_get(state)
  state, out = step(state, bad)
  assert not bool(out["finite"])
  after = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"])):
    np.testing.assert_array_equal(a, b)
  assert int(after["step"]) == 3 and int(after["skipped_steps"]) == 1
  assert int(after["bad_steps"]) == 1
  state, out = step(state, good)
  assert bool(out["finite"]) and int(state["bad_steps"]) == 0


def test_too_many_bad_steps_stop_the_run(tmp_path, capsys):
  cfg = tiny_config()
  cfg.train.max_bad_steps = 3

  def poison(step, batch):
    w = jnp.ones(batch["inputs"].shape)
    return {**batch, "weights": w * jnp.nan if step >= 12 else w}

  with pytest.raises(trainer.NonFiniteError, match=r"3 consecutive non-finite steps, the last at step 14 \(data position"):
    trainer.train(cfg, str(tmp_path), batch_hook=poison)
  assert "step 12 (data position" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
  rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if r.get("train/skipped_step")] == [12, 13, 14]
