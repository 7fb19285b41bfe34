"""Dense vs MoE scaling report from a sweep's results.csv: per-family laws and efficiency leverage.

  python tools/scaling_report.py --csv runs/scaling-tiny/results.csv \
      --out docs/results/scaling --bootstrap 100

For each family (the `--family` column, `_family` in configs/sweeps/scaling.py)
it fits a Chinchilla law L(N, D) with N = active parameters and D = training
tokens, then computes each MoE family's efficiency leverage over the dense
family (moejax.scaling.fit.efficiency_leverage: the dense compute that reaches
the MoE's compute-optimal loss, over the MoE's compute; compute C = 6 N D) at
every budget of the sweep. Writes `report.md` (tables), `fits.json` (every fit)
and `scaling.png` (points, fitted isoFLOP curves and compute-optimal frontiers).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from moejax.scaling import data as tables  # noqa: E402  (repo root first on sys.path)
from moejax.scaling.fit import efficiency_leverage, fit, loss_at_compute, loss_nd  # noqa: E402
from moejax.scaling.laws import get_law  # noqa: E402

REQUIRED = ("final_val_loss", "params_active", "tokens_seen")


def load(path: str, family_col: str, budget_col: str) -> dict[str, np.ndarray]:
  """The finished rows of results.csv, with the columns this report needs."""
  cols = tables.read_table(path)
  need = (family_col, budget_col) + REQUIRED
  missing = [c for c in need if c not in cols]
  if missing:
    raise SystemExit(f"{path}: missing column(s) {missing}; have {sorted(cols)}")
  out = {c: np.asarray(cols[c]) for c in need}
  ok = np.ones(len(out[family_col]), bool)
  for c in (budget_col,) + REQUIRED:
    ok &= np.isfinite(out[c].astype(float))
  dropped = int((~ok).sum())
  if dropped:
    print(f"[scaling_report] {dropped} unfinished or non-finite row(s) dropped", file=sys.stderr)
  return {c: v[ok] for c, v in out.items()}


def fit_families(rows: dict[str, np.ndarray], family_col: str, bootstrap: int,
                 max_starts: int | None = None, min_points: int = 6) -> dict[str, dict]:
  """Chinchilla fit per family; families with fewer than `min_points` rows are refused."""
  fits = {}
  for fam in sorted(set(rows[family_col].tolist())):
    m = rows[family_col] == fam
    n = int(m.sum())
    if n < min_points:
      raise SystemExit(f"family {fam!r}: {n} finished points, need >= {min_points} "
                       "for a 5-parameter Chinchilla fit")
    X = {"N": rows["params_active"][m].astype(float), "D": rows["tokens_seen"][m].astype(float)}
    res = fit("chinchilla", X, rows["final_val_loss"][m].astype(float), bootstrap=bootstrap,
              max_starts=max_starts)
    fits[fam] = res.to_dict()
  return fits


def budgets_6nd(rows: dict[str, np.ndarray], budget_col: str) -> dict[float, float]:
  """Each sweep budget label -> the median 6 N D of its runs (the law's compute unit)."""
  c = 6.0 * rows["params_active"].astype(float) * rows["tokens_seen"].astype(float)
  b = rows[budget_col].astype(float)
  return {float(v): float(np.median(c[b == v])) for v in sorted(set(b.tolist()))}


def leverage_table(fits: dict[str, dict], dense: str, budgets: dict[float, float]) -> dict:
  """EL[family][budget label] of every non-dense family over `dense`."""
  if dense not in fits:
    raise SystemExit(f"--dense {dense!r}: no such family; have {sorted(fits)}")
  dp = fits[dense]["params"]
  return {fam: {b: efficiency_leverage("chinchilla", dp, "chinchilla", f["params"], c)
                for b, c in budgets.items()}
          for fam, f in fits.items() if fam != dense}


def best_observed(rows: dict[str, np.ndarray], family_col: str, budget_col: str) -> dict:
  """Lowest validation loss (and its width in params) per family and budget."""
  out: dict[str, dict[float, tuple[float, float]]] = {}
  for fam, b, L, N in zip(rows[family_col], rows[budget_col].astype(float),
                          rows["final_val_loss"].astype(float),
                          rows["params_active"].astype(float)):
    cur = out.setdefault(fam, {}).get(b)
    if cur is None or L < cur[0]:
      out[fam][b] = (L, N)
  return out


def _fmt_ci(f: dict, name: str) -> str:
  v = f["params"][name]
  if name in f.get("ci", {}):
    lo, hi = f["ci"][name]
    return f"{v:.4g} [{lo:.3g}, {hi:.3g}]"
  return f"{v:.4g}"


def markdown(fits: dict, el: dict, best: dict, budgets: dict[float, float], dense: str) -> str:
  names = ("E", "A", "B", "alpha", "beta")
  lines = ["## Chinchilla fit per family (L in nats/byte; 95% bootstrap CI where computed)", "",
           "| family | points | " + " | ".join(names) + " | rmse(ln L) |",
           "|---|---|" + "---|" * len(names) + "---|"]
  for fam, f in fits.items():
    lines.append(f"| {fam} | {f['n_points']} | " + " | ".join(_fmt_ci(f, n) for n in names)
                 + f" | {f['rmse_log']:.4f} |")
  blabels = list(budgets)
  lines += ["", "## Best observed validation loss per budget (nats/byte; active params)", "",
            "| family | " + " | ".join(f"C={b:.0e}" for b in blabels) + " |",
            "|---|" + "---|" * len(blabels)]
  for fam in fits:
    cells = []
    for b in blabels:
      v = best.get(fam, {}).get(b)
      cells.append("-" if v is None else f"{v[0]:.4f} ({v[1] / 1e3:.0f}k)")
    lines.append(f"| {fam} | " + " | ".join(cells) + " |")
  lines += ["", f"## Efficiency leverage over `{dense}` (compute-optimal allocation, C = 6 N D)", "",
            "| family | " + " | ".join(f"C={b:.0e} (6ND={c:.2e})" for b, c in budgets.items())
            + " |", "|---|" + "---|" * len(blabels)]
  for fam, row in el.items():
    lines.append(f"| {fam} | " + " | ".join(
        "inf" if math.isinf(v) else f"{v:.2f}" for v in row.values()) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: dict, fits: dict, family_col: str, budget_col: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  law = get_law("chinchilla")
  for i, (fam, f) in enumerate(fits.items()):
    col = colors[i % len(colors)]
    m = rows[family_col] == fam
    N = rows["params_active"][m].astype(float)
    D = rows["tokens_seen"][m].astype(float)
    L = rows["final_val_loss"][m].astype(float)
    ax0.scatter(6 * N * D, L, color=col, s=18, label=fam)
    C = np.geomspace((6 * N * D).min() / 2, (6 * N * D).max() * 4, 60)
    ax0.plot(C, loss_at_compute(law, f["params"], C), color=col, lw=1)
    for b in sorted(set(rows[budget_col][m].astype(float).tolist())):
      mb = rows[budget_col][m].astype(float) == b
      c = float(np.median(6 * N[mb] * D[mb]))
      Ns = np.geomspace(N[mb].min() / 2, N[mb].max() * 2, 60)
      ax1.plot(Ns, loss_nd(law, f["params"], Ns, c / (6 * Ns)), color=col, lw=1, alpha=.7)
      ax1.scatter(N[mb], L[mb], color=col, s=18)
  ax0.set(xscale="log", xlabel="training compute 6ND (FLOPs)", ylabel="val loss (nats/byte)",
          title="loss vs compute; lines: compute-optimal frontier of each fit")
  ax1.set(xscale="log", xlabel="active parameters N", ylabel="val loss (nats/byte)",
          title="isoFLOP curves (one per budget) and runs")
  ax0.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n", 1)[1])
  ap.add_argument("--csv", required=True, help="a sweep's results.csv")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--family", default="_family", help="column naming each run's family")
  ap.add_argument("--budget", default="_budget", help="column with each run's FLOP budget")
  ap.add_argument("--dense", default="dense", help="the dense family's name")
  ap.add_argument("--bootstrap", type=int, default=0, help="resamples for CIs (0: none)")
  ap.add_argument("--max_starts", type=int, default=None,
                  help="L-BFGS from only the best-screened N grid points (default: all)")
  args = ap.parse_args(argv)
  rows = load(args.csv, args.family, args.budget)
  if args.dense not in set(rows[args.family].tolist()):
    raise SystemExit(f"--dense {args.dense!r}: no such family; have "
                     f"{sorted(set(rows[args.family].tolist()))}")
  fits = fit_families(rows, args.family, args.bootstrap, args.max_starts)
  budgets = budgets_6nd(rows, args.budget)
  el = leverage_table(fits, args.dense, budgets)
  best = best_observed(rows, args.family, args.budget)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text(markdown(fits, el, best, budgets, args.dense))
  result = {"fits": fits, "budgets_6nd": {str(k): v for k, v in budgets.items()},
            "efficiency_leverage": {f: {str(b): v for b, v in r.items()} for f, r in el.items()}}
  (out / "fits.json").write_text(json.dumps(result, indent=2) + "\n")
  plot(rows, fits, args.family, args.budget, str(out / "scaling.png"))
  print((out / "report.md").read_text())
  return result


if __name__ == "__main__":
  main()
