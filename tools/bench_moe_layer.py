"""Benchmark a whole MoE layer (router + dispatch + experts + combine, fwd+bwd).

Each row times jax.grad of sum(layer(x) * dy) w.r.t. the layer's parameters
and its input (dy: x reversed along D, a dense cotangent as in training), and
divides by the same for a dense SwiGLU FFN with the same active FLOPs per
token (hidden = top_k * expert_hidden), measured in the same process (calls
interleaved with the baseline's, see tools/timing.py).

  python tools/bench_moe_layer.py                    # the three reference shapes, f32 + bf16
  python tools/bench_moe_layer.py --quick            # smaller shapes, fewer repeats
  python tools/bench_moe_layer.py --dispatch dropless,capacity --dtype bfloat16
  python tools/bench_moe_layer.py --dispatch dropless --shapes 2  # E=64 only (a
                                                     # fresh process per shape
                                                     # gives steadier numbers)
  python tools/bench_moe_layer.py --devices 8        # expert parallelism (8 fake CPU
                                                     # devices on CPU; real ones elsewhere)

With --devices N each expert-parallel dispatch mode runs on meshes of N
devices (moejax/moe/dispatch/expert_parallel.py); rows give the bytes each
device sends to other devices per forward pass (from the shapes; the
backward pass moves the same again) and the time relative to the
single-device layer with the same dispatch on the same total batch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _devices_flag(argv: list[str]) -> int | None:
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
  return None


if (_n := _devices_flag(sys.argv)) and "xla_force_host_platform_device_count" not in \
    os.environ.get("XLA_FLAGS", ""):  # before JAX starts: fake CPU devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from moejax.config import default_config  # noqa: E402
from moejax.layers import SwiGLU  # noqa: E402
from moejax.moe import MoELayer  # noqa: E402
from moejax.moe.dispatch.capacity import expert_capacity  # noqa: E402
from moejax.parallel import mesh as mesh_lib  # noqa: E402
from timing import time_interleaved  # noqa: E402  (tools/, the script's dir)

SHAPES = [  # (T, D, F, E, k)
    (4096, 256, 512, 8, 2),
    (8192, 512, 1024, 8, 2),
    (8192, 512, 256, 64, 8),
]
QUICK_SHAPES = [(1024, 128, 256, 8, 2), (1024, 128, 64, 64, 8)]


def _fwd_bwd(module, x):
  params = module.init(jax.random.key(0), x)["params"]

  def loss(p, x):
    out = module.apply({"params": p}, x)
    y = out[0] if isinstance(out, tuple) else out
    # A dense, non-constant cotangent as in training: with sum(y) the
    # cotangent is all ones and XLA folds it into the backward's products.
    return jnp.sum(y * jax.lax.stop_gradient(x[..., ::-1]))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def layer_fwd_bwd(shape, dispatch: str, dtype: str, capacity_factor: float, x):
  """Jitted grad of the MoE layer and its parameters."""
  t, d, f, e, k = shape
  moe = default_config().moe
  moe.num_experts, moe.top_k, moe.expert_hidden = e, k, f
  moe.dispatch, moe.capacity_factor = dispatch, capacity_factor
  return _fwd_bwd(MoELayer(ml_collections.FrozenConfigDict(moe), dtype), x)


EP_SHAPES = [(8192, 256, 512, 8, 2), (8192, 256, 64, 64, 8)]  # (T, D, F, E, k), T in total
EP_MESHES = [(1, 1, -1), (2, 1, -1)]  # (data, fsdp, expert); -1 = the rest


def ep_bytes_sent(shape, dispatch: str, dtype: str, capacity_factor: float, n: int,
                  ep: int, platform: str) -> int:
  """Bytes one device sends to other devices in one forward pass, from the shapes.

  capacity: the [E, C, D] dispatch buffer (activation dtype) and the results
  (float32) go through all_to_all, (ep-1)/ep of each to other devices.
  dropless: the per-expert counts (int32 all_gather), then on CPU the padded
  exchange sends a worst-case [A_loc, D] block to each of the ep-1 peers
  each way; with ragged_all_to_all (TPU/GPU) only the rows routed to other
  devices move, (ep-1)/ep of the A_loc slots at uniform load.
  """
  t, d, f, e, k = shape
  act = 2 if dtype == "bfloat16" else 4
  a_loc = k * t // n
  if ep == 1:
    return 0
  if dispatch == "capacity":
    c = expert_capacity(a_loc, e, capacity_factor)
    return (ep - 1) * (e // ep) * c * d * (act + 4)
  counts = (ep - 1) * e * 4
  rows = (ep - 1) * a_loc if platform == "cpu" else (ep - 1) * a_loc // ep
  return counts + rows * d * (act + 4)


def bench_ep(args, shapes) -> None:
  n = jax.device_count()
  platform = jax.devices()[0].platform
  print(f"platform={platform} devices={n} (fake CPU devices share the host's cores)")
  print("| T | D | F | E | k | dtype | mesh (data,fsdp,expert) | dispatch | "
        "MB sent/device (fwd) | EP fwd+bwd ms | 1-device ms | EP / 1-device |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for shape in shapes:
    t, d, f, e, k = shape
    x = jax.random.normal(jax.random.key(1), (n, t // n, d), jnp.float32)
    for dtype in args.dtype.split(","):
      for dispatch in args.dispatch.split(","):
        g, p = layer_fwd_bwd(shape, dispatch, dtype, args.capacity_factor, x)
        base = time_interleaved({"1": (g, (p, x))}, args.repeats, warmup=args.warmup)["1"]
        for data, fsdp, expert in EP_MESHES:
          sizes = mesh_lib.resolve_axes({"data": data, "fsdp": fsdp, "expert": expert}, n,
                                        num_experts=e, batch_size=n)
          mesh = mesh_lib.make_mesh(sizes)
          ep = sizes["expert"]
          p_sh = mesh_lib.named(mesh_lib.param_specs(p, sizes), mesh)
          x_sh = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec())
          with jax.set_mesh(mesh):  # the layer takes the expert-parallel path
            args_sh = (jax.device_put(p, p_sh), jax.device_put(x, x_sh))
            ms = time_interleaved({"ep": (g, args_sh)}, args.repeats,
                                  warmup=args.warmup)["ep"]
          mb = ep_bytes_sent(shape, dispatch, dtype, args.capacity_factor, n, ep,
                             platform) / 2**20
          print(f"| {t} | {d} | {f} | {e} | {k} | {dtype} | ({sizes['data']},{sizes['fsdp']},"
                f"{ep}) | {dispatch} | {mb:.2f} | {ms * 1e3:.1f} | {base * 1e3:.1f} "
                f"| {ms / base:.2f}x |", flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dispatch", default="dropless,capacity")
  ap.add_argument("--dtype", default="float32,bfloat16")
  ap.add_argument("--capacity_factor", type=float, default=1.25)
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--warmup", type=int, default=6,
                  help="untimed rounds first (a fresh process runs its first calls slower)")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--shapes", default=None,
                  help="comma list of indices into the shape list (default: all, "
                  "each in a fresh process)")
  ap.add_argument("--rows_only", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--devices", type=int, default=None,
                  help="benchmark expert parallelism on this many devices")
  args = ap.parse_args()
  if args.quick:
    args.repeats, args.warmup = 2, 1
  if args.devices:
    if jax.device_count() != args.devices:
      raise SystemExit(f"--devices={args.devices} but JAX sees {jax.device_count()} devices")
    bench_ep(args, [(s[0] // 4,) + s[1:] for s in EP_SHAPES] if args.quick else EP_SHAPES)
    return
  shapes = QUICK_SHAPES if args.quick else SHAPES
  if args.shapes is not None:
    picked = [int(i) for i in args.shapes.split(",")]
    if any(not 0 <= i < len(shapes) for i in picked):
      raise SystemExit(f"--shapes={args.shapes}: indices must be in [0, {len(shapes)})")
    shapes = [shapes[i] for i in picked]
  if not args.rows_only:
    print(f"platform={jax.default_backend()} devices={jax.devices()}")
    print("| T | D | F | E | k | dtype | dispatch | fwd+bwd ms | dense FFN ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
  if args.shapes is None and len(shapes) > 1:
    # One process per shape: a process that has run the large shapes runs
    # the next ones measurably slower (the MoE layer more than the dense
    # FFN; E=64 float32 1.5x fresh, 1.8-2.0x after the others).
    for i in range(len(shapes)):
      subprocess.run([sys.executable, __file__, *sys.argv[1:], "--shapes", str(i),
                      "--rows_only"], check=True)
    return
  for shape in shapes:
    t, d, f, e, k = shape
    for dtype in args.dtype.split(","):
      x = jax.random.normal(jax.random.key(1), (1, t, d), jnp.float32)
      g_dense, p_dense = _fwd_bwd(SwiGLU(k * f, dtype), x)
      for dispatch in args.dispatch.split(","):
        # Each dispatch in its own rounds with the baseline: a slow one
        # (capacity: seconds per call, GBs of one-hot buffers) in the same
        # rounds leaves the next calls of the others slower.
        g, p = layer_fwd_bwd(shape, dispatch, dtype, args.capacity_factor, x)
        times = time_interleaved({"dense": (g_dense, (p_dense, x)),
                                  dispatch: (g, (p, x))}, args.repeats,
                                 warmup=args.warmup)
        ms, base = times[dispatch], times["dense"]
        print(f"| {t} | {d} | {f} | {e} | {k} | {dtype} | {dispatch} | {ms * 1e3:.1f} "
              f"| {base * 1e3:.1f} | {ms / base:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
