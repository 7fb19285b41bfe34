"""Benchmark a whole MoE layer (router + dispatch + experts + combine, fwd+bwd).

Each row times jax.grad of sum(layer(x)) w.r.t. the layer's parameters and its
input, and divides by the same for a dense SwiGLU FFN with the same active
FLOPs per token (hidden = top_k * expert_hidden), measured in the same process.

  python tools/bench_moe_layer.py                    # the three reference shapes, f32 + bf16
  python tools/bench_moe_layer.py --quick            # smaller shapes, fewer repeats
  python tools/bench_moe_layer.py --dispatch dropless,capacity --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections

from moejax.config import default_config
from moejax.layers import SwiGLU
from moejax.moe import MoELayer

SHAPES = [  # (T, D, F, E, k)
    (4096, 256, 512, 8, 2),
    (8192, 512, 1024, 8, 2),
    (8192, 512, 256, 64, 8),
]
QUICK_SHAPES = [(1024, 128, 256, 8, 2), (1024, 128, 64, 64, 8)]


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _fwd_bwd(module, x):
  params = module.init(jax.random.key(0), x)["params"]

  def loss(p, x):
    out = module.apply({"params": p}, x)
    y = out[0] if isinstance(out, tuple) else out
    return jnp.sum(y)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def bench(shape, dispatch: str, dtype: str, capacity_factor: float, repeats: int):
  t, d, f, e, k = shape
  moe = default_config().moe
  moe.num_experts, moe.top_k, moe.expert_hidden = e, k, f
  moe.dispatch, moe.capacity_factor = dispatch, capacity_factor
  x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32)
  layer = MoELayer(ml_collections.FrozenConfigDict(moe), dtype)
  g, p = _fwd_bwd(layer, x)
  return _time(g, p, x, repeats=repeats)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dispatch", default="dropless,capacity")
  ap.add_argument("--dtype", default="float32,bfloat16")
  ap.add_argument("--capacity_factor", type=float, default=1.25)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  shapes = QUICK_SHAPES if args.quick else SHAPES
  repeats = 2 if args.quick else args.repeats
  print(f"platform={jax.default_backend()} devices={jax.devices()}")
  print("| T | D | F | E | k | dtype | dispatch | fwd+bwd ms | dense FFN ms | ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for shape in shapes:
    t, d, f, e, k = shape
    for dtype in args.dtype.split(","):
      x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32)
      g, p = _fwd_bwd(SwiGLU(k * f, dtype), x)
      base = _time(g, p, x, repeats=repeats)
      for dispatch in args.dispatch.split(","):
        ms = bench(shape, dispatch, dtype, args.capacity_factor, repeats)
        print(f"| {t} | {d} | {f} | {e} | {k} | {dtype} | {dispatch} | {ms * 1e3:.1f} "
              f"| {base * 1e3:.1f} | {ms / base:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
