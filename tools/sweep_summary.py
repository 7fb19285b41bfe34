"""Mean and spread over seeds of a sweep's results.csv, one row per group of runs.

    python tools/sweep_summary.py SWEEP_DIR/results.csv --group _arch \
        [--metric final_val_bpb] [--reference topk] [--markdown TABLE.md]

Groups the rows of results.csv (written by `python -m experiments.sweep`) by
the column --group (e.g. `_arch` of configs/sweeps/architectures.py) and
reports per group: the number of runs, the mean, the sample standard
deviation (n - 1; "-" for a single run), min and max of --metric, the mean
difference to the --reference group with its standard error (the two
groups' errors combined as independent samples), the total and active
parameters and the median tokens/s relative to the reference's. Groups keep
the order of their first row. A missing column, group or non-numeric value
is an error naming it; nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys


def load(path: str) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _number(row: dict[str, str], column: str) -> float:
  if column not in row:
    raise ValueError(f"results.csv has no column {column!r}; columns: {sorted(row)}")
  try:
    v = float(row[column])
  except ValueError:
    raise ValueError(f"run {row.get('run', '?')!r}: column {column!r} holds "
                     f"{row[column]!r}, not a number") from None
  if not math.isfinite(v):
    raise ValueError(f"run {row.get('run', '?')!r}: column {column!r} is {v}")
  return v


def summarize(rows: list[dict[str, str]], group: str, metric: str,
              reference: str | None = None) -> list[dict]:
  """Per group (in first-row order): n, mean, std, min, max of `metric`, the difference
  of means to `reference` and its standard error, params and relative tokens/s."""
  if not rows:
    raise ValueError("results.csv has no rows")
  groups: dict[str, list[dict[str, str]]] = {}
  for r in rows:
    if group not in r:
      raise ValueError(f"results.csv has no column {group!r} (--group); columns: {sorted(r)}")
    groups.setdefault(r[group], []).append(r)
  if reference is not None and reference not in groups:
    raise ValueError(f"--reference {reference!r} is not a value of column {group!r}; "
                     f"values: {list(groups)}")
  out = []
  for name, rs in groups.items():
    v = [_number(r, metric) for r in rs]
    out.append({"group": name, "n": len(v), "mean": statistics.fmean(v),
                "std": statistics.stdev(v) if len(v) > 1 else None,
                "min": min(v), "max": max(v),
                "params_total": _number(rs[0], "params_total"),
                "params_active": _number(rs[0], "params_active"),
                "tokens_per_second": statistics.median(
                    _number(r, "tokens_per_second") for r in rs)})
  if reference is not None:
    ref = next(s for s in out if s["group"] == reference)
    for s in out:
      s["diff"] = s["mean"] - ref["mean"]
      var = sum((x["std"] ** 2 / x["n"]) for x in (s, ref) if x["std"] is not None)
      s["diff_se"] = math.sqrt(var) if s["std"] is not None and ref["std"] is not None else None
      s["speed"] = s["tokens_per_second"] / ref["tokens_per_second"]
  return out


def markdown(summary: list[dict], group: str, metric: str, reference: str | None) -> str:
  def f(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)
  head = [group, "runs", f"{metric} mean", "std", "min", "max"]
  if reference is not None:
    head += [f"mean - {reference}", "se"]
  head += ["params total", "params active", "tokens/s"]
  if reference is not None:
    head += [f"tokens/s vs {reference}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = [s["group"], str(s["n"]), f(s["mean"]), f(s["std"]), f(s["min"]), f(s["max"])]
    if reference is not None:
      cells += [f(s["diff"], "+.4f"), f(s["diff_se"])]
    cells += [f"{s['params_total'] / 1e6:.2f}M", f"{s['params_active'] / 1e6:.2f}M",
              f"{s['tokens_per_second']:.0f}"]
    if reference is not None:
      cells += [f"{s['speed']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("csv", help="a sweep's results.csv")
  p.add_argument("--group", required=True, help="the column whose values form the rows")
  p.add_argument("--metric", default="final_val_bpb")
  p.add_argument("--reference", default=None, help="a group to report differences against")
  p.add_argument("--markdown", default=None, help="also write the table to this file")
  a = p.parse_args(argv)
  try:
    table = markdown(summarize(load(a.csv), a.group, a.metric, a.reference), a.group,
                     a.metric, a.reference)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table, end="")
  if a.markdown:
    with open(a.markdown, "w") as f:
      f.write(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
