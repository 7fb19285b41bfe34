"""Train one run: `python -m experiments [--config FILE[:variant]] [--workdir DIR] [--config.key=value ...]`.

With no --config, runs configs/quickstart.py (or, if --workdir holds a
config.json, continues that run with its saved config). Without --workdir,
writes to runs/<config name>-<timestamp>. Re-running with the same --workdir
resumes from the newest checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
SAVED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, a in enumerate(argv):
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def resolve_argv(argv: list[str]) -> list[str]:
  """Adds --config when absent: the workdir's saved config, else the quickstart."""
  if _flag_value(argv, "config") is not None:
    return argv
  workdir = _flag_value(argv, "workdir")
  saved = workdir and os.path.join(workdir, "config.json")
  if saved and os.path.exists(saved):
    return argv[:1] + [f"--config={SAVED}:{saved}"] + argv[1:]
  return argv[:1] + [f"--config={QUICKSTART}"] + argv[1:]


def main() -> None:
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created or resumed).")
  flags.DEFINE_bool("overwrite", False, "Discard a run of a different config in --workdir.")
  # Multi-host (moejax/parallel/distributed.py); default: $MOEJAX_COORDINATOR etc.
  flags.DEFINE_string("coordinator", None, "host:port of process 0, or 'auto' (TPU pods).")
  flags.DEFINE_integer("num_processes", None, "Processes (hosts) in a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

  def run(_):
    from absl import logging  # noqa: PLC0415
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from moejax.parallel import distributed  # noqa: PLC0415
    try:  # before anything starts a JAX backend
      distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes,
                             flags.FLAGS.process_id)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    from moejax.train import trainer  # noqa: PLC0415
    from moejax.train.checkpoint import IncompatibleCheckpoint  # noqa: PLC0415
    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join(
        "runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
      data = trainer.prepare(cfg)
      if not flags.FLAGS.overwrite:
        trainer.check_workdir(cfg, workdir, overwrite=False)
    except ValueError as e:  # bad config: a message, not a traceback
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(f"run directory: {workdir}")
    try:
      summary = trainer.train(cfg, workdir, data, overwrite=flags.FLAGS.overwrite)
    except (trainer.NonFiniteError, IncompatibleCheckpoint) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    if summary.get("preempted"):
      return
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items()))

  app.run(run, argv=resolve_argv(sys.argv))


if __name__ == "__main__":
  main()
