"""Run a sweep: `python -m experiments.sweep --config configs/sweeps/NAME.py[:variant] --workdir DIR`.

  --parallel N        run N points at once (default 1)
  --dry-run           list the points and their run directories, run nothing
  --emit tpu --tpu NAME --zone ZONE [--project P] [--repo URL [--ref REF] | --copy]
                      write one launch script per point under DIR/launch/
                      instead of running (see python -m experiments.launch)

Finished points are skipped; killing the sweep and re-running the same
command continues where it stopped (each point resumes from its checkpoint).
SIGTERM/SIGINT are passed on to the running points, which checkpoint and
stop; DIR/results.csv always holds every finished point.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from experiments import launch
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


def emit_tpu(runner: SweepRunner, target: launch.Target, source: launch.Source) -> list[str]:
  """One bash script per point that installs the code and runs the point on every TPU worker.

  The commands come from experiments.launch; the point's config.json travels
  inside the run command, and each script waits for its point (--follow), so
  running the scripts one after another runs the sweep on one TPU VM.
  """
  out_dir = os.path.join(runner.dir, "launch")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, _, cfg in runner.points:
    wd = os.path.join(runner.dir, name)
    prepare_point(wd, cfg)
    with open(os.path.join(wd, "config.json")) as f:
      config_json = f.read()
    remote_wd = launch.remote_path(wd)
    commands = launch.launch_commands(
        target, ["--workdir", remote_wd], source, tag=name, follow=True,
        files={f"{remote_wd}/config.json": config_json})
    script = os.path.join(out_dir, f"{name}.sh")
    with open(script, "w") as f:
      f.write(launch.script_text(commands, f"Runs sweep point {name} on every worker of TPU VM "
                                 f"{target.tpu}; stop it with\n  python -m experiments.launch "
                                 f"--tpu {target.tpu} --zone {target.zone} --stop --name {name}"))
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
  launch.add_target_args(ap, required=False)  # --tpu --zone --project --repo --ref --copy
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
    try:
      target = launch.Target(args.tpu, args.zone, args.project)
      source = launch.resolve_source(args.repo, args.ref, args.copy)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    for path in emit_tpu(runner, target, source):
      print(path)
    return 0
  failed = runner.run()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
