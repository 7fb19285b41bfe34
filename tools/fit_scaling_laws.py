"""Fit a scaling law to a CSV (a sweep's results.csv or published data) and write fit.json.

  python tools/fit_scaling_laws.py --law chinchilla --csv results.csv --out fit.json
  python tools/fit_scaling_laws.py --law chinchilla --csv chinchilla_epoch \
      --col N=N_params --col D=D_tokens --col L=loss \
      --where 'epoch_outlier_excluded==0' --bootstrap 200 --out fit.json --plot fit.png

--csv takes a file path or the name of a published table shipped with moejax
(moejax/scaling/reference_data: chinchilla_epoch, clark2022_final_step,
clark2022_curves; provenance in its README.md); an existing file wins.

--col VAR=EXPR maps a law variable (or the target L / EL) to a column or an
arithmetic expression over columns. Without it, the first of these that the
CSV has is used (moejax sweep results.csv fields after the variable's own name):

  L  : L, loss, final_val_loss            EL : EL
  N  : N, params_active                   D  : D, tokens_seen
  C  : C, flops_per_token*tokens_seen     E  : E, num_experts, moe_num_experts
  G  : G, granularity, moe_granularity, model_ffn_hidden/moe_expert_hidden
  S  : S, 1-k/E, 1-top_k/num_experts, 1-moe_top_k/moe_num_experts
  A  : A, k/E, top_k/num_experts, moe_top_k/moe_num_experts

Column names that are not identifiers (moe.num_experts) are reachable as
moe_num_experts. --where keeps rows where a boolean expression holds
(comparisons, and/or/not, arithmetic, numbers, strings; nothing else runs).
Rows with a non-finite value in a used column are dropped (counted on stderr).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from moejax.scaling import data as tables  # noqa: E402  (repo root first on sys.path)
from moejax.scaling.fit import compute_optimal, fit  # noqa: E402
from moejax.scaling.laws import LAWS, get_law  # noqa: E402
from moejax.scaling.reference import NAMES as REFERENCE_NAMES  # noqa: E402
from moejax.scaling.reference import reference_path  # noqa: E402

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "L": ("L", "loss", "final_val_loss"),
    "EL": ("EL",),
    "N": ("N", "params_active"),
    "D": ("D", "tokens_seen"),
    "C": ("C", "flops_per_token*tokens_seen"),
    "E": ("E", "num_experts", "moe_num_experts"),
    "G": ("G", "granularity", "moe_granularity", "model_ffn_hidden/moe_expert_hidden"),
    "S": ("S", "1-k/E", "1-top_k/num_experts", "1-moe_top_k/moe_num_experts"),
    "A": ("A", "k/E", "top_k/num_experts", "moe_top_k/moe_num_experts"),
}


def _pairs(items: list[str], flag: str) -> dict[str, str]:
  out = {}
  for s in items:
    if "=" not in s:
      raise SystemExit(f"{flag}: expected NAME=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    out[k.strip()] = v.strip()
  return out


def resolve_columns(law_vars: tuple[str, ...], ns: dict, cols: dict[str, str]) -> dict[str, str]:
  """Expression for each variable: --col, else the first default the CSV has."""
  bad = set(cols) - set(law_vars)
  if bad:
    raise SystemExit(f"--col: {sorted(bad)} are not variables of this law; "
                     f"variables: {list(law_vars)}")
  out = {}
  for v in law_vars:
    if v in cols:
      out[v] = cols[v]
      continue
    for cand in DEFAULT_COLUMNS.get(v, (v,)):
      if tables.names_in(cand) <= set(ns):
        out[v] = cand
        break
    else:
      raise SystemExit(f"--col: no column for variable {v!r} (tried "
                       f"{list(DEFAULT_COLUMNS.get(v, (v,)))}); pass --col {v}=<column or "
                       f"expression>. CSV columns: {sorted(ns)}")
  return out


def csv_path(value: str) -> str:
  """--csv as a file: the path itself if it exists, else the bundled reference table."""
  if pathlib.Path(value).exists() or value not in REFERENCE_NAMES:
    return value
  return str(reference_path(value))


def load(args, law) -> tuple[dict, np.ndarray, dict[str, str], int]:
  """(X, y, column expressions, rows after --where) from the CSV and flags."""
  try:
    raw = tables.read_table(args.csv)
  except OSError as e:
    raise SystemExit(f"--csv: cannot read {args.csv!r}: {e}; pass a .csv/.csv.gz file or "
                     f"a bundled reference table: {list(REFERENCE_NAMES)}") from None
  ns = tables.namespace(raw)
  n = len(next(iter(raw.values())))
  mask = np.ones(n, bool)
  if args.where:
    try:
      mask = np.broadcast_to(np.asarray(tables.evaluate(args.where, ns), dtype=bool), (n,))
    except tables.ExprError as e:
      raise SystemExit(f"--where: {e}") from None
    if not mask.any():
      raise SystemExit(f"--where: {args.where!r} selected no rows of {n} in {args.csv}")
  need = (*law.variables, law.target)
  exprs = resolve_columns(need, ns, _pairs(args.col, "--col"))
  vals = {}
  for v, e in exprs.items():
    try:
      a = np.asarray(tables.evaluate(e, ns))
    except tables.ExprError as err:
      raise SystemExit(f"--col {v}={e}: {err}") from None
    if a.dtype == object:
      raise SystemExit(f"--col {v}={e}: not numeric")
    vals[v] = np.broadcast_to(a.astype(np.float64), (n,))[mask]
  ok = np.all([np.isfinite(a) for a in vals.values()], axis=0)
  if (~ok).any():
    print(f"dropping {int((~ok).sum())} rows with non-finite values", file=sys.stderr)
  if not ok.any():
    raise SystemExit("--col/--where: no rows with finite values left to fit")
  y = vals.pop(law.target)[ok]
  return {k: v[ok] for k, v in vals.items()}, y, exprs, int(mask.sum())


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n", 1)[1])
  ap.add_argument("--law", required=True, help=f"one of {sorted(LAWS)}")
  ap.add_argument("--csv", required=True, type=csv_path,
                  help=f"a .csv or .csv.gz file, or a bundled table: {list(REFERENCE_NAMES)}")
  ap.add_argument("--col", action="append", default=[], metavar="VAR=EXPR")
  ap.add_argument("--where", default=None, help="row filter, e.g. 'k==1 and E>1'")
  ap.add_argument("--bootstrap", type=int, default=0, help="resamples for CIs (0: none)")
  ap.add_argument("--ci_level", type=float, default=0.95)
  ap.add_argument("--huber_delta", type=float, default=1e-3)
  ap.add_argument("--max_starts", type=int, default=None,
                  help="L-BFGS from only the best-screened N grid points (default: all)")
  ap.add_argument("--fix", action="append", default=[], metavar="PARAM=VALUE",
                  help="hold a parameter at a value (natural units)")
  ap.add_argument("--cv_folds", type=int, default=0, help="k-fold validation error (0: off)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True, help="fit.json path")
  ap.add_argument("--plot", default=None, help="PNG path")
  args = ap.parse_args(argv)

  try:
    law = get_law(args.law)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  fixed = {}
  for k, v in _pairs(args.fix, "--fix").items():
    if k not in law.param_names:
      raise SystemExit(f"--fix: {k!r} is not a parameter of {law.name}: {law.param_names}")
    fixed[k] = float(v)
  X, y, exprs, n_where = load(args, law)
  t0 = time.time()
  res = fit(law, X, y, huber_delta=args.huber_delta, fixed=fixed, max_starts=args.max_starts,
            bootstrap=args.bootstrap, ci_level=args.ci_level, cv_folds=args.cv_folds,
            seed=args.seed)
  out = res.to_dict()
  out["extras"] = {"formula": law.formula, "source": law.source, "columns": exprs,
                   "csv": str(args.csv), "where": args.where, "rows_after_where": n_where,
                   "seconds": round(time.time() - t0, 2)}
  if law.name == "chinchilla":
    budgets = [1e18, 1e20, 1e22, 1e24]
    N, D = compute_optimal(law, law.params_array(res.params), np.array(budgets))
    out["extras"]["compute_optimal"] = [{"C": c, "N": float(n), "D": float(d)}
                                        for c, n, d in zip(budgets, N, D)]
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  if args.plot:
    from moejax.scaling.plot import plot_fit
    plot_fit(law, res, X, y, args.plot)
  print(json.dumps({"law": out["law"], "params": out["params"], "rmse_log": out["rmse_log"],
                    "n_points": out["n_points"]}, indent=None))
  return out


if __name__ == "__main__":
  main()
