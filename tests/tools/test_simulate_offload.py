"""tools/simulate_offload.py: the rows of a saved synthetic trace, --run, and exit code 2."""

from __future__ import annotations

import json
import os

import numpy as np

from moejax.inference import trace as trace_lib
from tests.conftest import load_tool, tiny_config

tool = load_tool("simulate_offload")


def _trace(model=None) -> trace_lib.Trace:
  """2 MoE layers of 8 experts, 2 per token; layer 1's pair is layer 0's shifted by 3."""
  rng = np.random.default_rng(0)
  t = 8 * 12
  first = rng.integers(0, 8, t)
  ex = np.stack([np.stack([first, (first + 1) % 8], -1),
                 np.stack([(first + 3) % 8, (first + 4) % 8], -1)], 1)
  return trace_lib.make_trace(ex, num_experts=8, sequence_T=np.arange(t) // 12, d_model=32,
                              expert_hidden=16, model=model)


def _save(tmp_path, tr, name="trace.npz") -> str:
  path = str(tmp_path / name)
  trace_lib.save(path, tr)
  return path


def test_rows_cover_every_policy_and_cache_size(tmp_path, capsys):
  path, out = _save(tmp_path, _trace()), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--cache-sizes", "2,4", "--gpu", "a100",
                    "--bandwidth-gbps", "16", "--json", out]) == 0
  rows = json.load(open(out))
  assert [(r["policy"], r["cache_size"]) for r in rows] == [
      (p, c) for p in tool.DEFAULT_POLICIES.split(",") for c in (2, 4)]
  keys = {"policy", "cache_size", "scope", "hit_rate", "bytes_moved", "latency_ms_per_token",
          "prefetch_accuracy", "prefetch_recall"}
  assert all(keys <= set(r) and r["scope"] == "layer" and r["tokens"] == 48 for r in rows)
  by = {(r["policy"], r["cache_size"]): r for r in rows}
  for c in (2, 4):
    for demand in ("lru", "lfu", "score_ema"):
      assert by[("belady", c)]["hit_rate"] >= by[(demand, c)]["hit_rate"]
      assert by[(demand, c)]["prefetch_accuracy"] is None
    # Each layer-0 expert's affinity row points at its pair shifted by 3: exact prefetch.
    assert by[("lru+prefetch_affinity", c)]["prefetch_accuracy"] == 1.0
    assert by[("lru+prefetch_affinity", c)]["hit_rate"] > by[("lru", c)]["hit_rate"]
    assert by[("lru", c)]["bytes_moved"] == by[("lru", c)]["misses"] * 3 * 32 * 16 * 2
  text = capsys.readouterr().out
  assert "312 TFLOP/s, 16 GB/s link" in text and "lru+prefetch_predictor" in text


def test_default_sizes_global_scope_and_dtype_bytes(tmp_path):
  path, out = _save(tmp_path, _trace()), str(tmp_path / "rows.json")
  assert tool.main(["--trace", path, "--scope", "global", "--policies", "lru,belady",
                    "--dtype-bytes", "4", "--json", out]) == 0
  rows = json.load(open(out))
  assert [r["cache_size"] for r in rows] == [2, 4, 8, 16] * 2  # K = 2 .. N * E = 16
  _, held = trace_lib.load(path).split(0.5)
  first_uses = len({(i, e) for i in range(2) for e in held.experts_TxNxK[:, i].ravel()})
  for r in (rows[3], rows[7]):  # everything fits: first uses only
    assert r["misses"] == first_uses and r["bytes_moved"] == first_uses * 3 * 32 * 16 * 4
  assert all(r["scope"] == "global" for r in rows)


def test_run_checks_the_trace_model(tmp_path, capsys):
  cfg = tiny_config(num_experts=8, expert_hidden=16)  # 2 layers, d_model 32, top 2: the trace's
  run = tmp_path / "run"
  os.makedirs(run)
  (run / "config.json").write_text(cfg.to_json_best_effort())
  same = _save(tmp_path, _trace(trace_lib.fingerprint(cfg)), "same.npz")
  assert tool.main(["--trace", same, "--run", str(run), "--policies", "lru",
                    "--cache-sizes", "2"]) == 0
  other = _save(tmp_path, _trace())
  assert tool.main(["--trace", other, "--run", str(run)]) == 2
  assert ("error: --trace: the trace comes from a different model (router: trace 'hand-built', "
          "model 'topk'") in capsys.readouterr().err
  assert tool.main(["--trace", other, "--run", str(tmp_path)]) == 2
  assert "is not a run directory (no config.json)" in capsys.readouterr().err


def test_bad_input_exits_2_naming_the_flag(tmp_path, capsys):
  path = _save(tmp_path, _trace())
  cases = [
      (["--trace", str(tmp_path / "none.npz")], "error: --trace: trace file"),
      (["--trace", path, "--cache-sizes", "0"], "--cache-sizes=0; allowed with scope='layer'"),
      (["--trace", path, "--cache-sizes", "9"], "--cache-sizes=9; allowed"),
      (["--trace", path, "--scope", "global", "--cache-sizes", "17"], "--cache-sizes=17"),
      (["--trace", path, "--cache-sizes", "2,x"], "--cache-sizes '2,x' is not"),
      (["--trace", path, "--policies", "lru,mru"], "--policies='mru' is not a policy"),
      (["--trace", path, "--gpu", "v100"], "--gpu='v100' is not a listed GPU"),
      (["--trace", path, "--bandwidth-gbps", "-1"], "--bandwidth-gbps -1.0; allowed"),
      (["--trace", path, "--tflops", "0"], "--tflops 0.0; allowed: a positive"),
      (["--trace", path, "--dtype-bytes", "0"], "--dtype-bytes 0; allowed: a positive"),
      (["--trace", path, "--train-fraction", "1"], "--train-fraction 1.0; allowed"),
      (["--trace", path, "--train-fraction", "0"], "--train-fraction 0.0; allowed"),
      (["--trace", path, "--prefetch-k", "9"], "--prefetch-k 9; allowed"),
  ]
  for argv, message in cases:
    assert tool.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (argv, err)
