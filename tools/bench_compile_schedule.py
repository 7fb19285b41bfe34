"""Compile time of the training step with layer-wise expert schedules, against depth.

The MoE layers of a schedule are scanned in stacks of equal (experts, top-k)
(moejax/layout.py), so compiling a 16-layer model should cost about what the
2-layer model of the same schedule costs. Each row compiles the real
trainer's jitted step (forward, backward, optimizer; `jit.lower().compile()`
on abstract state, no persistent compilation cache; the rows interleaved
in rounds, so a change of the machine's load hits them alike, after one
untimed warm-up compilation) and prints the median seconds and the ratios
to the 2-layer model of the same schedule and to the 2-layer
constant-schedule model (one MoE stack), measured in the same process.

  python tools/bench_compile_schedule.py              # 4 schedules at 2 and 16 layers
  python tools/bench_compile_schedule.py --repeats 5  # median of 5 rounds (default 3)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cache hit would time nothing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.quickstart import get_config  # noqa: E402
from moejax import layout  # noqa: E402
from moejax.train import trainer  # noqa: E402
from moejax.train.optimizer import make_optimizer  # noqa: E402
from moejax.validation import validate  # noqa: E402

SCHEDULES = {  # name: moe.layer_schedule overrides (quickstart: E=8, top-2)
    "constant": {},
    "pyramid": {"kind": "pyramid", "min_experts": 4},
    "pyramid-4-levels": {"kind": "pyramid", "min_experts": 2},
    "wave": {"kind": "wave", "min_experts": 4, "period": 2},
}


def config(schedule: str, layers: int):
  c = get_config("moe")
  c.model.num_layers = layers
  c.model.dtype = "float32"
  c.train.batch_size, c.train.seq_len = 8, 64
  for k, v in SCHEDULES[schedule].items():
    c.moe.layer_schedule[k] = v
  validate(c)
  return c


def compile_seconds(cfg) -> float:
  """Seconds to trace, lower and compile one fresh jit of the training step."""
  tx = make_optimizer(cfg.train)
  state = jax.eval_shape(lambda: trainer.init_state(cfg, tx))
  b, l = cfg.train.batch_size, cfg.train.seq_len
  batch = {"inputs": jax.ShapeDtypeStruct((b, l), jnp.int32),
           "targets": jax.ShapeDtypeStruct((b, l), jnp.int32)}
  step = trainer.make_train_step(cfg, tx)  # a fresh jit: nothing cached in memory
  t = time.perf_counter()
  step.lower(state, batch).compile()
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--layers", default="2,16", help="depths, the first is the baseline")
  p.add_argument("--schedules", default=",".join(SCHEDULES))
  args = p.parse_args()
  depths = [int(x) for x in args.layers.split(",")]
  names = args.schedules.split(",")
  if "constant" not in names:
    names = ["constant"] + names
  runs: dict[tuple[str, int], list[float]] = {(name, n): [] for name in names for n in depths}
  for name, n in runs:
    cfg = config(name, n)
    print(f"{name:>16} {n:>3} layers: {len(layout.moe_stacks(cfg))} MoE stacks, experts "
          f"{[e for e, _ in layout.moe_schedule(cfg)]}", flush=True)
  compile_seconds(config(names[0], depths[0]))  # warms up the process (not timed)
  for _ in range(args.repeats):  # rounds interleave the rows
    for name, n in runs:
      runs[name, n].append(compile_seconds(config(name, n)))
      print(f"  {name} {n}: {runs[name, n][-1]:.2f} s", flush=True)
  secs = {k: statistics.median(v) for k, v in runs.items()}
  for (name, n), v in runs.items():
    print(f"{name:>16} {n:>3} layers  {secs[name, n]:7.2f} s  (median of {len(v)})")
  base = secs["constant", depths[0]]
  print(f"\nratio to the {depths[0]}-layer model (target <= 1.5x at {depths[-1]} layers):")
  print(f"{'schedule':>16} {'layers':>6} {'vs same schedule':>17} {'vs constant':>12}")
  for name in names:
    for n in depths:
      print(f"{name:>16} {n:>6} {secs[name, n] / secs[name, depths[0]]:>16.2f}x "
            f"{secs[name, n] / base:>11.2f}x")


if __name__ == "__main__":
  main()
