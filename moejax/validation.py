"""`validate(cfg)`: every config check, before anything is compiled.

The checks live next to the components they check; this module only runs
them, in the order a reader fixes a config (keys and types first, then the
model, training, data, mesh, MoE layer with its router and expert family,
adapters, the source runs, which are read from disk, and last the schedules).
"""

from __future__ import annotations

import ml_collections

from moejax import schedules
from moejax.config import check_keys
from moejax.init import checks as init_checks
from moejax.model import transformer
from moejax.moe import adapters
from moejax.moe import layer as moe_layer
from moejax.parallel import mesh
from moejax.train import checks as train_checks
from moejax.train import data


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (naming the key, the value and what is allowed) for a bad config."""
  check_keys(cfg)
  transformer.check_config(cfg)
  train_checks.check_config(cfg)
  data.check_config(cfg)
  mesh.check_config(cfg)
  moe_layer.check_config(cfg)
  adapters.check_config(cfg)
  init_checks.check_config(cfg)
  schedules.check_config(cfg)
