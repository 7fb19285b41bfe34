"""tools/scaling_report.py: per-family fits and efficiency leverage on a synthetic sweep."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import scipy.optimize

from tests.scaling.conftest import REPO

TOOL = REPO / "tools" / "scaling_report.py"
DENSE = dict(E=1.0, A=60.0, B=80.0, alpha=0.30, beta=0.28)
MOE = dict(E=1.0, A=40.0, B=80.0, alpha=0.30, beta=0.28)  # same law, smaller N term


def _tool():
  spec = importlib.util.spec_from_file_location("scaling_report", TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _loss(p: dict, N: float, D: float) -> float:
  return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


@pytest.fixture
def sweep_csv(tmp_path):
  """An isoFLOP grid (4 widths x 4 budgets) for two families, noiseless, plus an unfinished row."""
  path = tmp_path / "results.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["name", "_family", "_budget", "params_active", "tokens_seen", "final_val_loss"])
    for fam, p in (("dense", DENSE), ("moe-E8", MOE)):
      for C in (1e13, 1e14, 1e15, 1e16):
        for N in (1e5, 1e6, 1e7, 1e8):
          D = C / (6 * N)
          w.writerow([f"{fam}-{N:.0e}-{C:.0e}", fam, C, N, D, _loss(p, N, D)])
    w.writerow(["crashed", "dense", 1e13, 1e5, "", ""])
  return path


def _el_by_hand(C: float) -> float:
  """EL from first principles: the dense compute whose optimal loss equals the MoE's."""
  def opt_loss(p, c):
    return scipy.optimize.minimize_scalar(
        lambda ln: _loss(p, math.exp(ln), c / (6 * math.exp(ln))),
        bounds=(0, math.log(c / 6)), method="bounded", options={"xatol": 1e-12}).fun
  target = opt_loss(MOE, C)
  lc = scipy.optimize.brentq(lambda l: opt_loss(DENSE, math.exp(l)) - target,
                             math.log(C), math.log(C) + 20, xtol=1e-10)
  return math.exp(lc) / C


def test_report_recovers_laws_and_leverage(sweep_csv, tmp_path, capsys):
  out = tmp_path / "report"
  res = _tool().main(["--csv", str(sweep_csv), "--out", str(out), "--max_starts", "8"])
  assert "unfinished" in capsys.readouterr().err
  for fam, p in (("dense", DENSE), ("moe-E8", MOE)):
    got = res["fits"][fam]["params"]
    assert res["fits"][fam]["n_points"] == 16
    for k, v in p.items():
      assert got[k] == pytest.approx(v, rel=0.02), (fam, k)
  for b, el in res["efficiency_leverage"]["moe-E8"].items():
    assert el > 1.0
    assert el == pytest.approx(_el_by_hand(res["budgets_6nd"][b]), rel=0.02)
  text = (out / "report.md").read_text()
  assert "| moe-E8 | 16 |" in text and "Efficiency leverage" in text
  assert json.loads((out / "fits.json").read_text())["efficiency_leverage"]
  assert (out / "scaling.png").stat().st_size > 0


def test_report_errors(sweep_csv, tmp_path):
  tool = _tool()
  with pytest.raises(SystemExit, match="--dense 'base'"):
    tool.main(["--csv", str(sweep_csv), "--out", str(tmp_path), "--dense", "base"])
  with pytest.raises(SystemExit, match="missing column"):
    tool.main(["--csv", str(sweep_csv), "--out", str(tmp_path), "--family", "arch"])
  rows = list(csv.reader(open(sweep_csv)))
  few = tmp_path / "few.csv"
  with open(few, "w", newline="") as f:
    csv.writer(f).writerows(rows[:4] + rows[17:22])
  with pytest.raises(SystemExit, match="need >= 6"):
    tool.main(["--csv", str(few), "--out", str(tmp_path), "--max_starts", "2"])
