"""2 processes x 4 fake CPU devices on localhost train like 1 process x 8 devices.

Process 1 alone gets SIGTERM before step 3: both processes must agree to
stop after step 3 and write one checkpoint, and the 2-process run resumed
through `python -m experiments --coordinator ... --num_processes 2
--process_id P` must reproduce the uninterrupted 1-process losses (data=2,
expert=4 mesh, 2 data shards, so both runs see the same global batches).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, fake_devices
from tests.parallel.test_training import losses


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, devices: int, n_proc: int, pid: int, port: int, stop_at: int):
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.Popen(
      [sys.executable, "-m", "tests.parallel.host_worker", str(workdir), str(devices),
       str(n_proc), str(pid), str(port), str(stop_at)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_cli(workdir, pid: int, port: int):
  """Continue the run in `workdir` with its saved config through `python -m experiments`."""
  env = fake_devices(4, {**os.environ, "PYTHONPATH": REPO})
  return subprocess.Popen(
      [sys.executable, "-m", "experiments", "--workdir", str(workdir),
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def output(proc) -> str:
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  return out


def result(proc) -> dict:
  return json.loads(output(proc).strip().splitlines()[-1])["result"]


def test_two_processes_match_one_and_agree_on_preemption(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  port = free_port()
  hosts = [start(two, 4, 2, pid, port, stop_at=3 if pid == 1 else 0) for pid in (0, 1)]
  single = start(one, 8, 1, 0, 0, stop_at=0)
  assert [result(p) for p in hosts] == [{"preempted": True, "steps": 3}] * 2
  assert sorted(os.listdir(two / "checkpoints")) == ["3"]
  port = free_port()
  resumed = [start_cli(two, pid, port) for pid in (0, 1)]  # the CLI's multi-host flags
  assert all("resumed from" in output(p) for p in resumed)
  with open(two / "summary.json") as f:
    assert json.load(f)["steps"] == 5
  assert result(single)["steps"] == 5
  want, got = losses(str(one)), losses(str(two))
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in range(1, 6)], [want[s] for s in range(1, 6)],
                             rtol=1e-5)
  assert (two / "hosts" / "1" / "metrics.jsonl").exists()  # process 1 logs apart
  with open(two / "sharding.json") as f:
    assert json.load(f)["num_processes"] == 2
