"""An exclusive lock on a run directory: one process trains in it at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time


@contextlib.contextmanager
def workdir_lock(workdir: str, timeout_s: float = 300.0):
  """Holds `workdir/.lock` (flock); waits for a previous process to let go.

  A run that was told to stop (or whose sweep runner died) may still be
  writing its last checkpoint when the next process starts on the same
  directory; the newcomer waits for it instead of racing it.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "w") as f:
    deadline = time.time() + timeout_s
    told = False
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.time() > deadline:
          raise RuntimeError(f"{workdir} is in use by another process "
                             f"(waited {timeout_s:.0f} s for {workdir}/.lock)") from None
        if not told:
          print(f"waiting for another process to release {workdir}/.lock")
          told = True
        time.sleep(0.5)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
