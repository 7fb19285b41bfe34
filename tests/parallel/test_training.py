"""Training on a (data=2, expert=4) mesh of 8 fake CPU devices vs one device.

Every run accumulates gradients over 2 micro-batches of 8 sequences (each
split over the mesh). The runs go through `python -m experiments` in subprocesses (XLA_FLAGS must
be set before JAX starts), started together to share the wait.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, TINY_FLAGS, fake_devices

FIVE_STEPS = TINY_FLAGS + ["--config.model.dtype=float32", "--config.train.batch_size=16",
                           "--config.train.grad_accum_steps=2",
                           "--config.train.steps=5", "--config.train.log_every=1",
                           "--config.train.eval_every=5", "--config.train.checkpoint_every=5"]


def start(workdir: str, devices: int, *extra: str) -> subprocess.Popen:
  env = fake_devices(devices, {**os.environ, "PYTHONPATH": REPO})
  return subprocess.Popen(
      [sys.executable, "-m", "experiments", "--config", os.path.join(REPO, "configs",
                                                                     "quickstart.py"),
       *FIVE_STEPS, *extra, "--workdir", workdir],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  return out


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_five_steps_on_data2_expert4_match_one_device(tmp_path):
  """Also (data=2, fsdp=2, expert=2): FSDP-sharded weights and optimizer state,
  with the `capacity` exchange at a capacity factor that drops nothing (the
  same function as dropless, so the same losses)."""
  single = start(str(tmp_path / "single"), 1)
  mesh = start(str(tmp_path / "mesh"), 8, "--config.parallel.expert=4")
  fsdp = start(str(tmp_path / "fsdp"), 8, "--config.parallel.data=2",
               "--config.parallel.fsdp=2", "--config.parallel.expert=2",
               "--config.moe.dispatch=capacity", "--config.moe.capacity_factor=4.0")
  for p in (single, mesh, fsdp):
    finish(p)
  want = losses(str(tmp_path / "single"))
  assert sorted(want) == [1, 2, 3, 4, 5]
  for name in ("mesh", "fsdp"):
    got = losses(str(tmp_path / name))
    assert sorted(got) == sorted(want), name
    np.testing.assert_allclose([got[s] for s in range(1, 6)], [want[s] for s in range(1, 6)],
                               rtol=1e-5, err_msg=name)
  with open(tmp_path / "fsdp" / "sharding.json") as f:
    specs = [v["spec"] for k, v in json.load(f)["params"].items() if "/experts/" not in k]
  assert any("fsdp" in s for s in specs)
  with open(tmp_path / "mesh" / "sharding.json") as f:
    sharding = json.load(f)
  assert sharding["mesh"] == {"data": 2, "fsdp": 1, "expert": 4}
  assert sharding["batch"] == [["data", "fsdp", "expert"]]
  experts = {k: v for k, v in sharding["params"].items() if "/experts/" in k}
  assert experts and all(v["spec"] == [None, "expert", None, None] for v in experts.values())
  assert not (tmp_path / "single" / "sharding.json").exists()  # one device: unchanged path
