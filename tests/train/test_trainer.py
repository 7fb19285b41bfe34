"""The training loop: it learns, writes the run directory, and resumes exactly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from moejax.train import trainer
from tests.conftest import tiny_config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f]


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  cfg = tiny_config()
  workdir = str(tmp_path_factory.mktemp("full"))
  return cfg, workdir, trainer.train(cfg, workdir)


def test_run_directory_and_learning(full_run):
  cfg, workdir, summary = full_run
  assert sorted(f for f in os.listdir(workdir) if f != ".lock") == ["checkpoints", "config.json", "metrics.jsonl",
                                         "summary.json", "tb"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == summary
  for key in ("final_val_loss", "params_total", "params_active", "flops_per_token",
              "tokens_seen", "steps", "wall_seconds", "tokens_per_second", "name"):
    assert key in summary
  assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 8 * 16
  losses = _losses(workdir)
  assert losses[30] < losses[1] - 1.0  # it learns (starts near ln 258 = 5.55)
  rows = _rows(workdir)
  val = [r for r in rows if "val/loss" in r]
  assert [r["step"] for r in val] == [10, 20, 30]
  assert val[-1]["val/loss"] == pytest.approx(summary["final_val_loss"])
  names = set().union(*rows)
  for name in ("train/lr", "train/grad_norm", "train/load_balance", "train/z_loss",
               "val/bpb", "perf/tokens_per_second", "perf/step_time_s",
               "moe/layer0/load/e3", "moe/layer1/router_entropy",
               "moe/layer0/dropped_fraction", "moe/layer1/load_cv"):
    assert name in names, name
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["moe"]["num_experts"] == cfg.moe.num_experts


def test_resume_is_exact(full_run, tmp_path):
  """A run killed after its step-20 checkpoint resumes to the same trajectory."""
  cfg, full_dir, summary = full_run
  workdir = str(tmp_path / "run")
  shutil.copytree(full_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))  # never written: killed
  os.remove(os.path.join(workdir, "summary.json"))
  resumed_summary = trainer.train(cfg, workdir)
  assert resumed_summary["steps"] == 30
  full, resumed = _losses(full_dir), _losses(workdir)
  steps = [r["step"] for r in _rows(workdir) if "train/loss" in r]
  assert steps == sorted(set(steps)) and sorted(resumed) == sorted(full)
  for s in sorted(full):
    assert resumed[s] == full[s], s  # bit for bit on CPU, rewritten past step 20
  assert resumed_summary["final_val_loss"] == summary["final_val_loss"]


def test_rerun_of_finished_run_rewrites_summary(full_run):
  cfg, workdir, summary = full_run
  again = trainer.train(cfg, workdir)
  assert again["steps"] == 30
  assert again["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
  steps = [r["step"] for r in _rows(workdir) if "train/loss" in r]
  assert len(steps) == len(set(steps))


def test_dense_model_trains(tmp_path):
  cfg = tiny_config()
  cfg.moe.enabled = False
  cfg.train.steps = 10
  summary = trainer.train(cfg, str(tmp_path))
  assert summary["params_active"] == summary["params_total"]
  assert np.isfinite(summary["final_val_loss"])
