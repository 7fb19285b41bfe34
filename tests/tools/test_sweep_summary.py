"""tools/sweep_summary.py: per-group mean and spread of a sweep's results.csv."""

from __future__ import annotations

import csv
import importlib.util
import math
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "sweep_summary.py"
_spec = importlib.util.spec_from_file_location("sweep_summary", _PATH)
ss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ss)

FIELDS = ["run", "_arch", "seed", "final_val_bpb", "params_total", "params_active",
          "tokens_per_second"]


def _row(arch, seed, bpb, tps=100.0):
  return {"run": f"{arch}-s{seed}", "_arch": arch, "seed": str(seed), "final_val_bpb": str(bpb),
          "params_total": "2000000", "params_active": "1000000", "tokens_per_second": str(tps)}


def _write(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    w.writerows(rows)


def test_by_hand(tmp_path):
  rows = [_row("topk", 0, 1.70, 100), _row("topk", 1, 1.72, 120), _row("topk", 2, 1.74, 110),
          _row("chain", 0, 1.66, 50), _row("chain", 1, 1.70, 60), _row("dense", 0, 1.80, 200)]
  path = tmp_path / "results.csv"
  _write(path, rows)
  out = ss.summarize(ss.load(str(path)), "_arch", "final_val_bpb", "topk")
  assert [s["group"] for s in out] == ["topk", "chain", "dense"]  # first-row order
  topk, chain, dense = out
  assert topk["n"] == 3 and topk["mean"] == pytest.approx(1.72)
  assert topk["std"] == pytest.approx(0.02)  # sample std of 1.70, 1.72, 1.74
  assert chain["diff"] == pytest.approx(1.68 - 1.72)
  # se = sqrt(s_c^2 / 2 + s_t^2 / 3), s_c = std(1.66, 1.70) = 0.02 * sqrt(2)
  assert chain["diff_se"] == pytest.approx(math.sqrt(0.0008 / 2 + 0.0004 / 3))
  assert chain["speed"] == pytest.approx(55 / 110)
  assert dense["std"] is None and dense["diff_se"] is None  # one run: no spread
  table = ss.markdown(out, "_arch", "final_val_bpb", "topk")
  assert "| dense | 1 | 1.8000 | - |" in table and "| +0.0800 | - |" in table
  assert ss.main([str(path), "--group", "_arch", "--reference", "topk",
                  "--markdown", str(tmp_path / "t.md")]) == 0
  assert (tmp_path / "t.md").read_text() == table


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.5, 3.0), min_size=2, max_size=6))
def test_mean_and_std_match_numpy(values):
  rows = [_row("a", i, v) for i, v in enumerate(values)]
  (s,) = ss.summarize(rows, "_arch", "final_val_bpb")
  np.testing.assert_allclose(s["mean"], np.mean(values), rtol=1e-12)
  np.testing.assert_allclose(s["std"], np.std(values, ddof=1), rtol=1e-9, atol=1e-12)
  assert s["min"] == min(values) and s["max"] == max(values)


@pytest.mark.parametrize("args,match", [
    (["--group", "nope"], "no column 'nope'"),
    (["--group", "_arch", "--metric", "missing"], "no column 'missing'"),
    (["--group", "_arch", "--reference", "moh"], "--reference 'moh' is not a value"),
])
def test_bad_arguments_name_what_is_wrong(tmp_path, capsys, args, match):
  path = tmp_path / "results.csv"
  _write(path, [_row("topk", 0, 1.7)])
  assert ss.main([str(path), *args]) == 2
  assert match in capsys.readouterr().err


def test_a_non_numeric_value_is_an_error_not_skipped(tmp_path):
  rows = [_row("topk", 0, 1.7), _row("topk", 1, "nan")]
  with pytest.raises(ValueError, match="'topk-s1'.*final_val_bpb.*nan"):
    ss.summarize(rows, "_arch", "final_val_bpb")
  rows = [_row("topk", 0, 1.7), _row("topk", 1, "")]
  with pytest.raises(ValueError, match="'topk-s1'.*not a number"):
    ss.summarize(rows, "_arch", "final_val_bpb")
