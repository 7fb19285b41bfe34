"""Routing analysis of a run: all plots (PNG) and routing_report.md with the numbers.

  python tools/analyze_routing.py --run runs/quickstart-moe --out routing/
  python tools/analyze_routing.py --run DIR --checkpoint 400 --out DIR --batches 4 \
      --segments 1,4,16,128 --cache 1,2,4

Captures the routing of checkpoint STEP (default: the newest) on
--batches batches of validation windows spread over the run's corpus (default
train.eval_batches) and runs every analysis of moejax.analysis: expert load and imbalance,
co-activation, token-id and domain (KJV book) specialisation, saturation
against every other kept checkpoint, local routing consistency (SRP / SCH)
and experts per token.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from moejax.analysis import report  # noqa: E402  (repo root first on sys.path)


def _ints(flag: str, s: str | None) -> list[int] | None:
  if s is None:
    return None
  try:
    vals = [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise SystemExit(f"{flag}={s!r}: expected comma-separated positive integers") from None
  if not vals or min(vals) < 1:
    raise SystemExit(f"{flag}={s!r}: expected comma-separated positive integers")
  return vals


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
  p.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--out", required=True, help="output directory for the plots and report")
  p.add_argument("--batches", type=int, default=None,
                 help="validation batches to capture (default: train.eval_batches)")
  p.add_argument("--segments", default=None, help="segment lengths for SRP/SCH, e.g. 1,4,16")
  p.add_argument("--cache", default=None, help="expert set / cache sizes for SRP/SCH, e.g. 1,2")
  p.add_argument("--no-saturation", action="store_true",
                 help="skip capturing the other checkpoints (saturation)")
  a = p.parse_args(argv)
  if not os.path.isdir(a.run):
    raise SystemExit(f"--run {a.run!r} is not a directory")
  try:
    res = report.analyze(a.run, a.out, step=a.checkpoint, num_batches=a.batches,
                         segment_lens=_ints("--segments", a.segments),
                         cache_sizes=_ints("--cache", a.cache),
                         saturation_steps=not a.no_saturation)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {os.path.join(a.out, 'routing_report.md')} and {', '.join(res['plots'])} "
        f"(step {res['step']}, {res['tokens']} tokens)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
