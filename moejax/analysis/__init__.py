"""Routing analysis: capture a model's routing, then pure analyses and plots on it.

`capture(run_dir or Model, data, layers=...)` -> `Routing` (routing.py);
one concept per module: load, coactivation, specialization, saturation,
locality (SRP / SCH), adaptive (experts per token); `report.analyze` runs them
all on a run directory (tools/analyze_routing.py); `online` holds the cheap
metrics the trainer logs at each eval.
"""

from moejax.analysis import (adaptive, coactivation, load, locality,  # noqa: F401
                             online, saturation, specialization)
from moejax.analysis.routing import (Model, Routing, capture, load_model, make_routing,
                                     moe_layers)

__all__ = ["Model", "Routing", "adaptive", "capture", "coactivation", "load", "load_model",
           "locality", "make_routing", "moe_layers", "online", "saturation", "specialization"]
