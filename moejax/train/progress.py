"""A dependency-free terminal progress bar: step, loss and tokens/s."""

from __future__ import annotations

import sys
import time


class Progress:
  """Redraws one line on a terminal; prints a line every `every` updates otherwise."""

  def __init__(self, total: int, start: int = 0, every: int = 50, stream=sys.stderr):
    self.total, self.step, self.every, self.stream = total, start, every, stream
    self.tty = stream.isatty()
    self.t0 = time.time()

  def update(self, step: int, **fields: float) -> None:
    self.step = step
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
    line = f"[{bar}] {step}/{self.total} {info}"
    if self.tty:
      self.stream.write("\r" + line + " " * 4)
      self.stream.flush()
    elif step % self.every == 0 or step == self.total:
      self.stream.write(line + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
