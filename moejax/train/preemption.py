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

  def agreed(self) -> bool:
    """Whether any process of the run was asked to stop; the same on every host.

    Multi-host runs must save the same step everywhere, so the flag is
    all-gathered (one tiny collective per call, which every process makes).
    """
    import jax  # noqa: PLC0415 (signal handling itself needs no JAX)
    if jax.process_count() == 1:
      return self.requested()
    from jax.experimental import multihost_utils  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    flags = multihost_utils.process_allgather(np.int32(self.requested()))
    return bool(np.max(flags))

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
