"""Benchmark gmm (forward and forward+backward) against a FLOP-matched dense matmul.

For every backend and case it prints the median time (calls interleaved
with the baseline's), the achieved
throughput (GFLOP/s on CPU, TFLOP/s on accelerators) and the ratio to a dense
[m_live, k] x [k, n] matmul (same dtype, float32 accumulation, fwd+bwd = the
three matmuls of its VJP) measured in the same process. The "live=m/4" cases
also print the ratio to the same backend's full-buffer fwd+bwd time, timed
in the same rounds.

  python tools/bench_gmm.py --dtype float32
  python tools/bench_gmm.py --dtype bfloat16 --backends cpu,xla --repeats 5
  python tools/bench_gmm.py --quick
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import pallas_kernels as pk  # noqa: E402  (repo root first on sys.path)
from timing import time_interleaved  # noqa: E402  (tools/, the script's dir)

_ACCEL = {"mosaic_tpu": "tpu", "triton": "gpu"}


def _available(backend: str) -> bool:
  platform = _ACCEL.get(backend)
  return platform is None or jax.default_backend() == platform


def _group_sizes(m_live: int, num_groups: int, kind: str) -> np.ndarray:
  if kind == "balanced":
    weights = np.ones(num_groups)
  else:  # Skewed: Zipf-like load, group i gets ~1/(i+1), plus empty groups.
    weights = 1.0 / np.arange(1, num_groups + 1)
    weights[num_groups // 2::3] = 0.0
  sizes = np.floor(weights / weights.sum() * m_live).astype(np.int32)
  sizes[0] += m_live - sizes.sum()
  return sizes


def _dot(a, b, contract):
  out = jax.lax.dot_general(a, b, (contract, ((), ())),
                            preferred_element_type=jnp.float32)
  return out.astype(a.dtype)


def _fwd_bwd(f):
  def run(lhs, rhs, dout):
    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *vjp(dout))
  return jax.jit(run)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--backends", default=None,
                      help="comma list (default: all available but interpret*)")
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--warmup", type=int, default=4,
                      help="untimed rounds first (a fresh process runs its first calls slower)")
  parser.add_argument("--quick", action="store_true",
                      help="2 repeats, G=8 and G=64 balanced + live=m/4 only")
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  repeats, warmup = (2, 1) if args.quick else (args.repeats, args.warmup)
  accel = jax.default_backend() in ("gpu", "tpu")
  unit, scale = ("TFLOP/s", 1e12) if accel else ("GFLOP/s", 1e9)
  if args.backends:
    backends = args.backends.split(",")
  else:
    backends = [b for b in pk.BACKENDS
                if _available(b) and not b.startswith("interpret")]
  backends = [b for b in backends if _available(b)]

  m, k, n = 8192, 512, 1024
  cases = [(m, k, n, 8, "balanced", m), (m, k, n, 8, "skewed", m),
           (m, k, n, 64, "balanced", m), (m, k, n, 64, "skewed", m),
           (m, k, n, 8, "balanced", m // 4), (m, k, n, 64, "balanced", m // 4)]
  if args.quick:
    cases = [c for c in cases if c[4] == "balanced"]
  if accel:
    cases.append((8192, 4096, 14336, 8, "balanced", 8192))

  print(f"# bench_gmm  platform={jax.default_backend()} dtype={dtype.name} "
        f"repeats={repeats}  jax={jax.__version__}")
  header = (f"| {'case':<34} | {'backend':<10} | {'fwd ms':>8} | {unit:>8} | "
            f"{'x dense':>7} | {'fwd+bwd ms':>10} | {unit:>8} | {'x dense':>7}"
            f" | {'x full':>6} |")
  print(header)
  print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  rng = np.random.default_rng(0)
  for (m, k, n, groups, kind, live) in cases:
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((groups, k, n)) / np.sqrt(k), dtype)
    dout = jnp.asarray(rng.standard_normal((m, n)), dtype)
    sizes = jnp.asarray(_group_sizes(live, groups, kind))
    flops = 2 * live * k * n

    def dense(x, w):
      return _dot(x, w, ((1,), (0,)))

    def dense_fwd_bwd(x, w, dy):
      # The three matmuls of the dense VJP, each with operands in `dtype` and
      # float32 accumulation (jax.vjp would run the backward in float32).
      return dense(x, w), _dot(dy, w, ((1,), (1,))), _dot(x, dy, ((0,), (0,)))

    fns = {"dense": (jax.jit(dense), (lhs[:live], rhs[0])),
           "dense_bwd": (jax.jit(dense_fwd_bwd),
                         (lhs[:live], rhs[0], dout[:live]))}
    for backend in backends:
      def f(x, w, backend=backend):
        return pk.gmm(x, w, sizes, backend=backend)
      fns[backend] = (jax.jit(f), (lhs, rhs))
      fns[backend + "_bwd"] = (_fwd_bwd(f), (lhs, rhs, dout))
      if live != m:  # the full buffer again, in the same rounds
        full = jnp.asarray(_group_sizes(m, groups, kind))
        def f_full(x, w, backend=backend, full=full):
          return pk.gmm(x, w, full, backend=backend)
        fns[backend + "_full"] = (_fwd_bwd(f_full), (lhs, rhs, dout))
    times = time_interleaved(fns, repeats, warmup=warmup)
    d_fwd, d_bwd = times["dense"], times["dense_bwd"]
    name = f"m={m} k={k} n={n} G={groups} {kind}"
    if live != m:
      name += " live=m/4"
    print(f"| {name:<34} | {'dense':<10} | {d_fwd * 1e3:8.1f} | "
          f"{flops / d_fwd / scale:8.1f} | {1.0:7.2f} | {d_bwd * 1e3:10.1f} | "
          f"{3 * flops / d_bwd / scale:8.1f} | {1.0:7.2f} | {'':>6} |",
          flush=True)
    for backend in backends:
      t_fwd, t_bwd = times[backend], times[backend + "_bwd"]
      vs_full = (f"{t_bwd / times[backend + '_full']:6.2f}" if live != m
                 else "")
      print(f"| {name:<34} | {backend:<10} | {t_fwd * 1e3:8.1f} | "
            f"{flops / t_fwd / scale:8.1f} | {t_fwd / d_fwd:7.2f} | "
            f"{t_bwd * 1e3:10.1f} | {3 * flops / t_bwd / scale:8.1f} | "
            f"{t_bwd / d_bwd:7.2f} | {vs_full:>6} |", flush=True)


if __name__ == "__main__":
  main()
