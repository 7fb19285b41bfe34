"""Sweep grids and the resumable sweep runner."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.sweep.grid import Sweep, apply, axis, derive, point_name, product, zip_
from moejax.config import ConfigError, default_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SWEEP_FILE = textwrap.dedent('''
    from experiments.sweep.grid import Sweep, axis, product
    from tests.conftest import tiny_config

    def get_sweep(variant="two"):
      base = tiny_config()
      base.train.steps = {steps}
      base.train.eval_every = 4
      base.train.checkpoint_every = 2
      base.train.log_every = 2
      base.train.warmup_steps = 1
      n = {{"two": 2, "three": 3}}[variant]
      return Sweep("test", base, product(axis("seed", list(range(n)))))
''')


def test_combinators():
  pts = product(axis("a.x", [1, 2]), axis("b", ["u", "v"]))
  assert pts == [{"a.x": 1, "b": "u"}, {"a.x": 1, "b": "v"}, {"a.x": 2, "b": "u"},
                 {"a.x": 2, "b": "v"}]
  assert zip_(axis("a", [1, 2]), axis("b", [3, 4])) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  with pytest.raises(ValueError, match="equal length"):
    zip_(axis("a", [1, 2]), axis("b", [3]))
  assert derive(axis("a", [1, 2]), lambda p: {"c": 10 * p["a"]}) == [
      {"a": 1, "c": 10}, {"a": 2, "c": 20}]
  with pytest.raises(ValueError, match="set twice"):
    product(axis("a", [1]), axis("a", [2]))


def test_apply_and_names():
  cfg = apply(default_config(), {"moe.num_experts": 4, "train.lr": 1})
  assert cfg.moe.num_experts == 4 and cfg.train.lr == 1.0
  with pytest.raises(ConfigError, match="unknown sweep key 'moe.num_expert'"):
    apply(default_config(), {"moe.num_expert": 4})
  with pytest.raises(ConfigError, match="unknown sweep key 'mo.top_k'"):
    apply(default_config(), {"mo.top_k": 4})
  assert point_name({"train.lr": 0.001, "moe.router": "topk"}) == "moe.router=topk__train.lr=0.001"
  long = point_name({f"k{i}": "x" * 20 for i in range(10)})
  assert len(long) <= 100 and long == point_name({f"k{i}": "x" * 20 for i in range(10)})


def test_invalid_point_fails_before_running():
  sweep = Sweep("bad", default_config(), axis("moe.top_k", [2, 99]))
  with pytest.raises(ConfigError, match="moe.top_k=99"):
    sweep.configs()


def _sweep(tmp_path, *args, steps=4, wait=True):
  path = tmp_path / "sweep.py"
  path.write_text(SWEEP_FILE.format(steps=steps))
  cmd = [sys.executable, "-m", "experiments.sweep", "--config", f"{path}:{args[0]}",
         "--workdir", str(tmp_path / "out"), *args[1:]]
  env = {**os.environ, "PYTHONPATH": REPO}
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _rows(tmp_path):
  with open(tmp_path / "out" / "results.csv") as f:
    return list(csv.DictReader(f))


def test_dry_run_and_emit(tmp_path):
  r = _sweep(tmp_path, "three", "--dry-run")
  assert r.returncode == 0, r.stderr
  assert "3 points" in r.stdout and "seed=2" in r.stdout
  r = _sweep(tmp_path, "two", "--emit", "tpu", "--tpu", "my-tpu", "--zone", "us-central2-b",
             "--repo", "https://example.com/moejax.git", "--ref", "main")
  assert r.returncode == 0, r.stderr
  scripts = sorted(os.listdir(tmp_path / "out" / "launch"))
  assert scripts == ["seed=0.sh", "seed=1.sh"]
  text = (tmp_path / "out" / "launch" / "seed=0.sh").read_text()
  assert "my-tpu" in text and "--worker=all" in text and "seed=0" in text
  assert "pip install --quiet -e" in text and "config.json" in text  # install + the point's config
  r = _sweep(tmp_path, "two", "--emit", "tpu", "--tpu", "my tpu", "--zone", "us-central2-b",
             "--repo", "https://example.com/moejax.git")
  assert r.returncode == 2 and "--tpu='my tpu' is invalid" in r.stderr


def test_killed_sweep_resumes_without_losing_rows(tmp_path):
  # Run the two-point sweep to completion, then extend it to three points.
  r = _sweep(tmp_path, "two")
  assert r.returncode == 0, r.stdout + r.stderr
  assert [row["seed"] for row in _rows(tmp_path)] == ["0", "1"]
  # The third point is killed (SIGKILL to the runner) while it trains.
  p = _sweep(tmp_path, "three", steps=4, wait=False)
  wd = tmp_path / "out" / "seed=2"
  deadline = time.time() + 300
  while not (wd / "checkpoints" / "2").exists() and time.time() < deadline:
    time.sleep(0.02)  # the point has 2 more steps, an eval and a save left to run
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert [row["seed"] for row in _rows(tmp_path)] == ["0", "1"]  # no row lost
  r = _sweep(tmp_path, "three")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "seed=0: finished, skipped" in r.stdout and "seed=1: finished, skipped" in r.stdout
  rows = _rows(tmp_path)
  assert [row["seed"] for row in rows] == ["0", "1", "2"]
  assert all(row["steps"] == "4" and float(row["final_val_loss"]) > 0 for row in rows)
  assert (tmp_path / "out" / "results.md").read_text().count("\n") == 5


@pytest.mark.parametrize("spec", ["configs/sweeps/routers.py:short", "configs/sweeps/routers.py",
                                  "configs/sweeps/scaling.py:tiny", "configs/sweeps/scaling.py",
                                  "configs/sweeps/architectures.py",
                                  "configs/sweeps/architectures.py:short"])
def test_shipped_sweeps_validate(spec):
  from experiments.sweep.__main__ import load_sweep  # noqa: PLC0415
  sweep = load_sweep(os.path.join(REPO, spec))
  configs = sweep.configs()  # every point applies and validates
  assert len(configs) == len(sweep.points) >= 12
  names = [n for n, _, _ in configs]
  assert len(set(names)) == len(names)


def test_scaling_points_spend_their_budget():
  from experiments.sweep.__main__ import load_sweep  # noqa: PLC0415
  from moejax.model import flops_per_token  # noqa: PLC0415
  sweep = load_sweep(os.path.join(REPO, "configs/sweeps/scaling.py:tiny"))
  for _, point, cfg in sweep.configs():
    spent = flops_per_token(cfg) * cfg.train.batch_size * cfg.train.seq_len * cfg.train.steps
    assert point["_budget"] == pytest.approx(spent, rel=0.05) or cfg.train.steps == 20
