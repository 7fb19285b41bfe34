"""tools/simulate_placement.py: the rows of a saved synthetic trace, and exit code 2."""

from __future__ import annotations

import json

import numpy as np

from moejax.inference import trace as trace_lib
from tests.conftest import load_tool

tool = load_tool("simulate_placement")

KEYS = {"method", "devices", "replicas", "a2a_bytes_per_token_layer", "a2a_bytes_per_token",
        "a2a_dedup_bytes_per_token_layer", "load_imbalance", "devices_per_token", "note"}


def _trace_file(tmp_path) -> str:
  """One MoE layer; tokens use co-activated pairs (2i, 2i + 1) of 8 experts; d_model 32."""
  rng = np.random.default_rng(0)
  t = 10 * 16
  a = rng.integers(0, 4, t)
  tr = trace_lib.make_trace(np.stack([2 * a, 2 * a + 1], -1)[:, None], num_experts=8,
                            sequence_T=np.arange(t) // 16, d_model=32)
  path = str(tmp_path / "trace.npz")
  trace_lib.save(path, tr)
  return path


def test_rows_of_every_method(tmp_path, capsys):
  path, out = _trace_file(tmp_path), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--devices", "4", "--json", out]) == 0
  rows = {r["method"]: r for r in json.load(open(out))}
  assert list(rows) == ["round_robin", "greedy", "milp", "replicate_hot"]
  for r in rows.values():
    assert set(r) == KEYS and r["devices"] == 4 and r["load_imbalance"] >= 1.0
  assert rows["round_robin"]["devices_per_token"] == 2.0
  assert rows["greedy"]["devices_per_token"] == rows["milp"]["devices_per_token"] == 1.0
  assert rows["milp"]["note"] == "milp (optimal): layers [0]"
  assert rows["replicate_hot"]["replicas"] == 4 and rows["round_robin"]["replicas"] == 0
  # Sequences 5..9 are scored (homes 1, 2, 3, 0, 1); round robin puts each pair on devices
  # (2i % 4, 2i % 4 + 1): 1 or 2 of its 2 assignments are remote, 32 values * 2 bytes, twice.
  assert 128.0 <= rows["round_robin"]["a2a_bytes_per_token"] <= 256.0
  text = capsys.readouterr().out
  assert "home device: sequence index % 4" in text and "replicate_hot: 4 replicas" in text


def test_methods_replicas_and_dtype_bytes(tmp_path):
  path, out = _trace_file(tmp_path), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--devices", "2", "--methods", "round_robin,replicate_hot",
                    "--replicas", "3", "--dtype-bytes", "4", "--json", out]) == 0
  rr, hot = json.load(open(out))
  assert (rr["method"], hot["method"], hot["replicas"]) == ("round_robin", "replicate_hot", 3)
  # Pairs (2i, 2i + 1) on devices (0, 1): every token touches both; one assignment is remote.
  assert rr["devices_per_token"] == 2.0 and rr["a2a_bytes_per_token"] == 32 * 4 * 2
  assert tool.main(["--trace", path, "--devices", "1", "--json", out]) == 0
  assert all(r["a2a_bytes_per_token"] == 0.0 and r["replicas"] == 0
             for r in json.load(open(out)))


def test_bad_input_exits_2_naming_the_flag(tmp_path, capsys):
  path = _trace_file(tmp_path)
  cases = [
      (["--trace", str(tmp_path / "none.npz"), "--devices", "2"], "--trace: trace file"),
      (["--trace", path, "--devices", "3"], "--devices=3; allowed: a divisor of the 8 experts"),
      (["--trace", path, "--devices", "16"], "--devices=16; allowed: a divisor"),
      (["--trace", path, "--devices", "0"], "--devices=0; allowed: an integer >= 1"),
      (["--trace", path, "--devices", "2", "--replicas", "9"],
       "--replicas=9; allowed: at most 8 for 8 experts on 2 devices"),
      (["--trace", path, "--devices", "2", "--replicas", "-1"], "--replicas=-1; allowed"),
      (["--trace", path, "--devices", "2", "--methods", "spread,greedy"],
       "--methods 'spread,greedy': spread; allowed: round_robin, greedy"),
      (["--trace", path, "--devices", "2", "--train-fraction", "0"], "--train-fraction 0.0"),
      (["--trace", path, "--devices", "2", "--dtype-bytes", "0"], "--dtype-bytes 0"),
      (["--trace", path, "--devices", "2", "--milp-time-limit", "0"], "--milp-time-limit 0.0"),
  ]
  for argv, message in cases:
    assert tool.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (argv, err)
