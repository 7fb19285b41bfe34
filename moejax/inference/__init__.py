"""Inference-time tools on routing traces.

trace.py: the compact routing trace file (`Trace`, `save`, `load`, `capture`);
offload.py: replaying a trace against a GPU expert cache (eviction and
prefetching policies, latency model); placement.py: expert placement over
devices for expert parallelism.
"""

from moejax.inference import offload, placement, trace  # noqa: F401
from moejax.inference.trace import (Trace, capture, check_model, fingerprint, load, make_trace,
                                    save)

__all__ = ["Trace", "capture", "check_model", "fingerprint", "load", "make_trace", "offload",
           "placement", "save", "trace"]
