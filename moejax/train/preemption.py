"""SIGTERM / SIGINT become a request to stop after the current step.

The trainer polls `requested()` after each step; when set it writes a
checkpoint at that step, flushes its logs and returns, so a preempted run
exits with status 0 and resumes exactly on the next start.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
  """Installs handlers for SIGTERM and SIGINT while active (main thread only)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self.signum: int | None = None

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self._event.set()

  def requested(self) -> bool:
    return self._event.is_set()

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
