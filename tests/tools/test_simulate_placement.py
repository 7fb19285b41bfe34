"""tools/simulate_placement.py: rows of a saved synthetic trace, and its errors."""

from __future__ import annotations

import json

import numpy as np

from moejax.inference import trace as trace_lib
from tests.conftest import load_tool

tool = load_tool("simulate_placement")


def _trace_file(tmp_path) -> str:
  """Tokens use co-activated pairs (2i, 2i + 1) of 8 experts, one MoE layer."""
  rng = np.random.default_rng(0)
  t = 10 * 16
  a = rng.integers(0, 4, t)
  ex = np.stack([2 * a, 2 * a + 1], -1)[:, None]
  tr = trace_lib.make_trace(ex, num_experts=8, sequence_T=np.arange(t) // 16, d_model=32)
  path = str(tmp_path / "trace.npz")
  trace_lib.save(path, tr)
  return path


def test_rows_of_every_method(tmp_path, capsys):
  path, out = _trace_file(tmp_path), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--devices", "4", "--replicate", "4", "--json", out]) == 0
  rows = {r["placement"]: r for r in json.load(open(out))}
  assert list(rows) == ["round_robin", "greedy_coactivation", "milp", "replicate_hot"]
  for r in rows.values():
    assert set(r) == {"placement", "devices", "replicas", "a2a_bytes_per_token",
                      "a2a_bytes_per_token_layer", "load_imbalance", "devices_per_token",
                      "note"}
    assert r["devices"] == 4 and r["load_imbalance"] >= 1.0
  assert rows["round_robin"]["devices_per_token"] == 2.0
  assert rows["greedy_coactivation"]["devices_per_token"] == 1.0
  assert rows["milp"]["devices_per_token"] == 1.0 and rows["milp"]["note"] == "layers [0]: optimal"
  assert rows["replicate_hot"]["replicas"] == 4
  # Round robin: each token (home = sequence % 4) runs on devices {e % 4, e % 4 + 1}, so it
  # sends to 1 or 2 remote devices of 32 values * 2 bytes, twice.
  assert 128.0 <= rows["round_robin"]["a2a_bytes_per_token"] <= 256.0
  assert "home device: sequence index % 4" in capsys.readouterr().out


def test_methods_and_home_options(tmp_path):
  path, out = _trace_file(tmp_path), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--devices", "2", "--methods", "round_robin",
                    "--home", "token", "--activation-bytes", "4", "--json", out]) == 0
  (row,) = json.load(open(out))
  assert row["placement"] == "round_robin" and row["devices"] == 2
  # Pairs (2i, 2i + 1) on devices (0, 1): every token touches both, one is remote.
  assert row["devices_per_token"] == 2.0 and row["a2a_bytes_per_token"] == 32 * 4 * 2


def test_devices_not_dividing_experts_run_replicate_hot_only(tmp_path):
  path, out = _trace_file(tmp_path), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--devices", "3", "--replicate", "1", "--json", out]) == 0
  (row,) = json.load(open(out))  # 3 devices hold 8 + 1 slots
  assert row["placement"] == "replicate_hot" and row["replicas"] == 1


def test_bad_input_exits_2_naming_the_flag(tmp_path, capsys):
  path = _trace_file(tmp_path)
  cases = [
      (["--trace", str(tmp_path / "none.npz"), "--devices", "2"], "--trace: trace file"),
      (["--trace", path, "--devices", "3"], "--devices=3 with replicas=0: --devices must divide"),
      (["--trace", path, "--devices", "0"], "--devices 0; allowed"),
      (["--trace", path, "--devices", "3", "--replicate", "2"],
       "--devices=3 with --replicate=2: --devices must divide experts + replicas = 10"),
      (["--trace", path, "--devices", "4", "--replicate", "1", "--methods", "replicate_hot"],
       "--devices=4 with --replicate=1: --devices must divide experts + replicas = 9"),
      (["--trace", path, "--devices", "2", "--methods", "replicate_hot"],
       "--methods replicate_hot needs --replicate R >= 1"),
      (["--trace", path, "--devices", "2", "--methods", "spread"], "--methods 'spread'"),
      (["--trace", path, "--devices", "2", "--milp-time-limit", "0"], "--milp-time-limit 0.0"),
  ]
  for argv, message in cases:
    assert tool.main(argv) == 2, argv
    assert message in capsys.readouterr().err, argv
