"""Runs a sweep: one run directory per point, resumable, results.csv kept whole.

Each point's resolved config is written to DIR/<point>/config.json and run as
`python -m experiments --workdir DIR/<point>` in a subprocess (which resumes
from its newest checkpoint). A point whose summary.json reports the
configured number of steps is finished and skipped. After every finished
point, DIR/results.csv and DIR/results.md are rewritten atomically from all
finished points, so killing the sweep at any moment loses no row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import ml_collections

from experiments.sweep.grid import Point, Sweep
from moejax.config import config_changes

SUMMARY_FIELDS = ("name", "final_val_loss", "final_val_bpb", "params_total", "params_active",
                  "flops_per_token", "tokens_seen", "steps", "wall_seconds",
                  "tokens_per_second")


def _saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def finished_summary(workdir: str, cfg: ml_collections.ConfigDict) -> dict | None:
  """The point's summary if it finished with this config and its number of steps."""
  path = os.path.join(workdir, "summary.json")
  saved = _saved_config(workdir)
  if not os.path.exists(path) or saved is None or config_changes(saved, cfg):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("steps") == cfg.train.steps else None


def prepare_point(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes the point's config.json; refuses a directory holding another config.

  Keys that only change how a run proceeds (train.steps, eval/checkpoint
  cadence, the mesh) may differ: the run continues from its checkpoint.
  """
  saved = _saved_config(workdir)
  if saved is not None:
    changed = config_changes(saved, cfg)
    if changed:
      raise ValueError(f"{workdir} holds a run with a different config (differs in: "
                       f"{', '.join(changed[:5])}); move it away or use another --workdir")
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, "config.json"))


def write_results(sweep_dir: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
  """results.csv (swept keys + summary fields) and results.md, atomically."""
  cols = ["run"] + keys + [f for f in SUMMARY_FIELDS if f != "name"]
  extra = sorted({k for r in rows for k in r} - set(cols) - {"name"})
  cols += extra
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow(r)
  _atomic_write(os.path.join(sweep_dir, "results.csv"), buf.getvalue())
  md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    md.append("| " + " | ".join(_md(r.get(c, "")) for c in cols) + " |")
  _atomic_write(os.path.join(sweep_dir, "results.md"), "\n".join(md) + "\n")


def _md(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class SweepRunner:
  """Runs the points of `sweep` under `sweep_dir`, `parallel` at a time."""

  def __init__(self, sweep: Sweep, sweep_dir: str, parallel: int = 1):
    if parallel < 1:
      raise ValueError(f"--parallel={parallel} is invalid: must be >= 1")
    self.sweep, self.dir, self.parallel = sweep, sweep_dir, parallel
    self.points = sweep.configs()  # validates every point before anything runs
    self.keys = sorted({k for _, p, _ in self.points for k in p})
    self._children: dict[str, subprocess.Popen] = {}
    self._stopping = False

  def _row(self, name: str, point: Point, summary: dict) -> dict:
    return {"run": name, **point, **summary}

  def results(self) -> list[dict]:
    rows = []
    for name, point, cfg in self.points:
      s = finished_summary(os.path.join(self.dir, name), cfg)
      if s is not None:
        rows.append(self._row(name, point, s))
    return rows

  def _on_signal(self, signum, frame):
    del frame
    self._stopping = True
    for p in self._children.values():
      if p.poll() is None:
        p.send_signal(signum)  # each run checkpoints and exits 0

  def run(self) -> int:
    """Runs unfinished points; returns the number of failed points."""
    os.makedirs(self.dir, exist_ok=True)
    todo = []
    for name, point, cfg in self.points:
      wd = os.path.join(self.dir, name)
      if finished_summary(wd, cfg) is not None:
        print(f"[sweep] {name}: finished, skipped")
        continue
      prepare_point(wd, cfg)
      todo.append(name)
    write_results(self.dir, self.results(), self.keys)
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = []
    try:
      while (todo or self._children) and not (self._stopping and not self._children):
        while todo and len(self._children) < self.parallel and not self._stopping:
          name = todo.pop(0)
          wd = os.path.join(self.dir, name)
          log = open(os.path.join(wd, "log.txt"), "a")
          print(f"[sweep] {name}: running (log: {wd}/log.txt)")
          self._children[name] = subprocess.Popen(
              [sys.executable, "-m", "experiments", "--workdir", wd],
              stdout=log, stderr=subprocess.STDOUT, cwd=_repo_root(),
              start_new_session=True,  # a terminal's Ctrl-C reaches us; we forward it
              preexec_fn=_die_with_parent)
          log.close()
        time.sleep(0.2)
        for name, p in list(self._children.items()):
          if p.poll() is None:
            continue
          del self._children[name]
          _, _, cfg = next(x for x in self.points if x[0] == name)
          if finished_summary(os.path.join(self.dir, name), cfg) is not None:
            print(f"[sweep] {name}: done")
          elif p.returncode == 0 and self._stopping:
            print(f"[sweep] {name}: stopped, will resume")
          else:
            failed.append(name)
            print(f"[sweep] {name}: FAILED (exit {p.returncode}), see its log.txt")
          write_results(self.dir, self.results(), self.keys)
    finally:
      for s, h in previous.items():
        signal.signal(s, h)
    write_results(self.dir, self.results(), self.keys)
    if self._stopping:
      print("[sweep] stopped by signal; re-run the same command to continue")
    return len(failed)


def _die_with_parent() -> None:
  """In the child: get SIGTERM (checkpoint and stop) if the sweep runner dies."""
  if sys.platform.startswith("linux"):
    import ctypes  # noqa: PLC0415
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
