"""All routers of configs/routers.py under identical conditions.

Command (2-core CPU):
  python -m experiments.sweep --config configs/sweeps/routers.py --workdir runs/routers          # 600 steps each, ~45 min
  python -m experiments.sweep --config configs/sweeps/routers.py:short --workdir runs/routers-short  # 300 steps each, ~25 min
Writes runs/.../results.csv and results.md (validation loss, load CV, drop and
overflow fraction, experts per token, tokens/s per router). The table of a
real `:short` run is in docs/results/routers.md.
"""

from configs.routers import ROUTERS, get_config
from experiments.sweep.grid import Sweep
from moejax.config import flat_keys

VARIANTS = {"full": 600, "short": 300}


def get_sweep(variant: str = "full") -> Sweep:
  if variant not in VARIANTS:
    raise ValueError(f"configs/sweeps/routers.py:{variant}: allowed variants {sorted(VARIANTS)}")
  steps = VARIANTS[variant]
  base = get_config("topk")
  base.name = f"routers-{variant}"
  base.train.steps = steps
  base.train.eval_every = steps // 3
  base.train.checkpoint_every = steps // 3
  base_keys = flat_keys(base)
  points = []
  for name in ROUTERS:
    cfg = get_config(name)
    point = {"name": f"router-{name}"}
    # Every key the router variant changes relative to top-k becomes part of the point.
    for key, value in flat_keys(cfg).items():
      if key not in ("name", "train.steps", "train.eval_every", "train.checkpoint_every") \
          and base_keys.get(key) != value:
        point[key] = value
    points.append(point)
  return Sweep(f"routers-{variant}", base, points)

