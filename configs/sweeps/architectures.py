"""The architectures comparison: dense, top-k MoE and every architecture of configs/architectures.py.

Command (2-core CPU; ~3-6 minutes per run, 3 seeds x every variant):
  python -m experiments.sweep --config configs/sweeps/architectures.py --workdir runs/architectures
  python -m experiments.sweep --config configs/sweeps/architectures.py:short --workdir runs/arch-short  # 300 steps
  python -m experiments.sweep --config configs/sweeps/architectures.py:smoke --workdir runs/arch-smoke  # 1 seed, 60 steps

What it measures: every variant of configs/architectures.py (the dense
baseline at the quickstart's active parameters per token, the quickstart's
top-k MoE, and each architecture of docs/architectures.md at the same active
expert compute per token, as each variant's docstring states) on the default corpus (the
byte-level KJV) with the same data, steps and tokens; seeds 0, 1, 2.
results.csv holds per run the validation loss (nats/byte; bits per byte =
loss / ln 2), total and active parameters and tokens/s, one row per run and
seed. docs/results/architectures.md has the `short` setting's table (about
1 hour on 2 cores); the 600-step `full` setting has not been run.
"""

from configs.architectures import VARIANTS, get_config
from experiments.sweep.grid import Sweep
from moejax.config import flat_keys

SETTINGS = {"full": (600, (0, 1, 2)), "short": (300, (0, 1, 2)), "smoke": (60, (0,))}
RUN_KEYS = ("name", "seed", "train.steps", "train.warmup_steps", "train.eval_every", "train.checkpoint_every")


def get_sweep(variant: str = "full") -> Sweep:
  if variant not in SETTINGS:
    raise ValueError(f"configs/sweeps/architectures.py:{variant}: allowed variants "
                     f"{sorted(SETTINGS)}")
  steps, seeds = SETTINGS[variant]
  base = get_config("topk")
  base.name = f"architectures-{variant}"
  base.train.steps = steps
  base.train.warmup_steps = min(base.train.warmup_steps, steps // 6)
  base.train.eval_every = steps // 3
  base.train.checkpoint_every = steps // 3
  base_keys = flat_keys(base)
  points = []
  for arch in VARIANTS:
    changed = {k: v for k, v in flat_keys(get_config(arch)).items()
               if k not in RUN_KEYS and base_keys.get(k) != v}
    for seed in seeds:
      points.append({"name": f"{arch}-s{seed}", "_arch": arch, "seed": seed, **changed})
  return Sweep(f"architectures-{variant}", base, points)
