"""Metric sinks: metrics.jsonl (one object per logged step) and TensorBoard.

TensorBoard event files are written with tensorboardX (no TensorFlow).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from tensorboardX import SummaryWriter


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drop entries with step > last_step (a resumed run rewrites them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  kept = []
  for ln in lines:
    try:
      if json.loads(ln)["step"] <= last_step:
        kept.append(ln)
    except (json.JSONDecodeError, KeyError):
      continue  # a line cut by a crash mid-write
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _jsonable(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class MetricWriter:
  """Writes scalars to metrics.jsonl and tb/, images (heatmaps) to tb/."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    truncate_jsonl(self.path, resume_step)
    self._jsonl = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))

  def heatmap(self, step: int, tag: str, m_HxW: np.ndarray) -> None:
    """A matrix as a grey image, scaled to [0, 1] by its max (e.g. layer x expert load)."""
    m = np.asarray(m_HxW, np.float32)
    self._tb.add_image(tag, m / max(float(m.max()), 1e-12), int(step), dataformats="HW")

  def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
    self._tb.add_histogram(tag, np.asarray(values), int(step))

  def flush(self) -> None:
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
