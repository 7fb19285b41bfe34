"""`python -m experiments`: runs, overrides, continuation and clean config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, TINY_FLAGS

TINY = TINY_FLAGS + ["--config.train.eval_every=4", "--config.train.checkpoint_every=4"]


def _run(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_train_then_continue_with_saved_config(tmp_path):
  workdir = str(tmp_path / "run")
  r = _run("--workdir", workdir, "--config.train.steps=4", *TINY)
  assert r.returncode == 0, r.stderr
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["steps"] == 4
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["name"] == "quickstart-moe" and cfg["model"]["d_model"] == 32
  # No --config: continue with the saved config, extended by an override.
  r = _run("--workdir", workdir, "--config.train.steps=8")
  assert r.returncode == 0, r.stderr
  assert "resumed from" in r.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["steps"] == 8
  with open(os.path.join(workdir, "config.json")) as f:
    cfg2 = json.load(f)
  assert cfg2["train"]["steps"] == 8 and cfg2["model"]["d_model"] == 32


def test_bad_config_is_a_message_not_a_traceback(tmp_path):
  r = _run("--workdir", str(tmp_path / "x"), "--config.moe.top_k=9", *TINY)
  assert r.returncode != 0
  assert "moe.top_k=9" in r.stderr and "moe.num_experts=4" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "x")


def test_unknown_override_key_fails():
  r = _run("--config.moe.num_expertz=3")
  assert r.returncode != 0
  assert "num_expertz" in r.stderr
