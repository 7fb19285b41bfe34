"""tools/fit_scaling_laws.py end to end, its errors, and the --where evaluator."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from moejax.scaling.data import ExprError, evaluate, namespace, read_table
from moejax.scaling.laws import CHINCHILLA
from tests.scaling.conftest import REPO, TRUE, synthetic

TOOL = REPO / "tools" / "fit_scaling_laws.py"


def _tool():
  spec = importlib.util.spec_from_file_location("fit_scaling_laws", TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture
def results_csv(tmp_path):
  """A sweep-style results.csv: summary fields plus a swept key and an outlier flag."""
  X, y, _ = synthetic(CHINCHILLA, n=60, noise=1e-3)
  path = tmp_path / "results.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "moe.num_experts", "params_active", "flops_per_token", "tokens_seen",
                "final_val_loss", "bad"])
    for i in range(60):
      w.writerow([f"run{i}", 8, X["N"][i], 6 * X["N"][i], X["D"][i], y[i], int(i < 5)])
    w.writerow(["broken", 8, 1e8, 6e8, 1e10, 99.0, 1])  # filtered out by --where
  return path


def test_cli_end_to_end(results_csv, tmp_path):
  out, png = tmp_path / "fit.json", tmp_path / "fit.png"
  cmd = [sys.executable, str(TOOL), "--law", "chinchilla", "--csv", str(results_csv),
         "--where", "bad==0 and moe_num_experts==8", "--bootstrap", "10",
         "--max_starts", "4", "--cv_folds", "3", "--out", str(out), "--plot", str(png)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  d = json.loads(out.read_text())
  assert {"law", "params", "ci", "huber_loss", "rmse_log", "n_points"} <= set(d)
  assert d["law"] == "chinchilla" and d["n_points"] == 55
  assert d["extras"]["columns"] == {"N": "params_active", "D": "tokens_seen",
                                    "L": "final_val_loss"}
  for k, v in TRUE["chinchilla"].items():
    assert d["params"][k] == pytest.approx(v, rel=0.15)
    lo, hi = d["ci"][k]
    assert lo <= d["params"][k] <= hi
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_gz_and_col_expressions(results_csv, tmp_path):
  gz = tmp_path / "results.csv.gz"
  gz.write_bytes(gzip.compress(results_csv.read_bytes()))
  out = tmp_path / "fit.json"
  d = _tool().main(["--law", "chinchilla", "--csv", str(gz), "--where", "bad==0",
                    "--col", "N=flops_per_token/6", "--col", "L=final_val_loss",
                    "--max_starts", "2", "--out", str(out)])
  assert d["n_points"] == 55 and d["extras"]["columns"]["N"] == "flops_per_token/6"
  assert d["params"]["alpha"] == pytest.approx(TRUE["chinchilla"]["alpha"], rel=0.1)


@pytest.mark.parametrize("argv,flag", [
    (["--law", "kaplan"], "--law"),
    (["--law", "chinchilla", "--col", "N=nope"], "--col"),
    (["--law", "krajewski"], "--col"),  # no column for G
    (["--law", "chinchilla", "--where", "bad==7"], "--where"),
    (["--law", "chinchilla", "--where", "__import__('os')"], "--where"),
    (["--law", "chinchilla", "--fix", "Q=1"], "--fix"),
])
def test_cli_errors_name_the_flag(results_csv, tmp_path, argv, flag):
  with pytest.raises(SystemExit) as e:
    _tool().main([*argv, "--csv", str(results_csv), "--out", str(tmp_path / "x.json")])
  assert flag in str(e.value)
  assert not (tmp_path / "x.json").exists()


def test_where_evaluator():
  ns = namespace({"k": np.array([1.0, 2.0, 1.0]), "router_type": np.array(
      ["S-Base", "S-Base", "Dense"], dtype=object), "moe.top_k": np.array([1.0, 2.0, 4.0])})
  assert evaluate("router_type=='S-Base' and k==1", ns).tolist() == [True, False, False]
  assert evaluate("not (k > 1) or router_type == 'Dense'", ns).tolist() == [True, False, True]
  assert evaluate("1 <= moe_top_k < 4", ns).tolist() == [True, True, False]
  np.testing.assert_allclose(evaluate("1 - k/moe_top_k**2", ns), [0.0, 0.5, 15 / 16])
  for bad in ["open('x')", "k.__class__", "().__class__", "k[0]", "lambda: 1", "[k for k in k]",
              "__import__('os').system('true')", "k if k else k", "None", "True"]:
    with pytest.raises(ExprError):
      evaluate(bad, ns)
  with pytest.raises(ExprError, match="unknown column"):
    evaluate("kk == 1", ns)


def test_read_table_types(tmp_path):
  p = tmp_path / "t.csv"
  p.write_text("a,b,c\n1,x,\n2.5,y,3\n")
  t = read_table(str(p))
  assert t["a"].dtype == np.float64 and t["b"].dtype == object
  assert np.isnan(t["c"][0]) and t["c"][1] == 3.0
