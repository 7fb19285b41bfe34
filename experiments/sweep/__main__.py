"""Run a sweep: `python -m experiments.sweep --config configs/sweeps/NAME.py[:variant] --workdir DIR`.

  --parallel N        run N points at once (default 1)
  --dry-run           list the points and their run directories, run nothing
  --emit tpu --tpu NAME --zone ZONE
                      write one launch script per point under DIR/launch/
                      instead of running

Finished points are skipped; killing the sweep and re-running the same
command continues where it stopped (each point resumes from its checkpoint).
SIGTERM/SIGINT are passed on to the running points, which checkpoint and
stop; DIR/results.csv always holds every finished point.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

from experiments.sweep.grid import Sweep
from experiments.sweep.runner import SweepRunner, prepare_point


def load_sweep(spec: str) -> Sweep:
  """`path.py[:variant]` -> the file's get_sweep(variant)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config={spec!r}: no such sweep file {path!r}")
  mod_spec = importlib.util.spec_from_file_location("_sweep_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  if not hasattr(mod, "get_sweep"):
    raise ValueError(f"--config={spec!r}: {path} defines no get_sweep(variant)")
  return mod.get_sweep(variant) if variant else mod.get_sweep()


def emit_tpu(runner: SweepRunner, tpu: str, zone: str) -> list[str]:
  """One bash script per point that runs it on every worker of a TPU VM."""
  out_dir = os.path.join(runner.dir, "launch")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, _, cfg in runner.points:
    wd = os.path.join(runner.dir, name)
    prepare_point(wd, cfg)
    remote = f"cd moejax && python -m experiments --workdir {shlex.quote(wd)}"
    script = os.path.join(out_dir, f"{name}.sh")
    with open(script, "w") as f:
      f.write("#!/usr/bin/env bash\n# Runs sweep point " + name + " on TPU VM " + tpu + ".\n"
              "set -euo pipefail\n"
              f"gcloud compute tpus tpu-vm ssh {shlex.quote(tpu)} --zone {shlex.quote(zone)} "
              f"--worker=all --command {shlex.quote(remote)}\n")
    os.chmod(script, 0o755)
    paths.append(script)
  return paths


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m experiments.sweep",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="configs/sweeps/NAME.py[:variant]")
  ap.add_argument("--workdir", required=True, help="sweep directory")
  ap.add_argument("--parallel", type=int, default=1)
  ap.add_argument("--dry-run", action="store_true")
  ap.add_argument("--emit", choices=["tpu"])
  ap.add_argument("--tpu")
  ap.add_argument("--zone")
  args = ap.parse_args(argv)
  if args.emit and not (args.tpu and args.zone):
    ap.error("--emit tpu needs --tpu NAME and --zone ZONE")
  try:
    runner = SweepRunner(load_sweep(args.config), args.workdir, args.parallel)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    for name, point, _ in runner.points:
      print(f"{os.path.join(args.workdir, name)}  {point}")
    print(f"{len(runner.points)} points")
    return 0
  if args.emit:
    for path in emit_tpu(runner, args.tpu, args.zone):
      print(path)
    return 0
  failed = runner.run()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
