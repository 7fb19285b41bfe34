"""Acceptance check of the CPU grouped matmul in a plain Python process.

Nothing is set up before Python starts (no GLIBC_TUNABLES, no re-execution):
the script imports `pallas_kernels` the way a user's script or notebook
does, then times `pallas_kernels.gmm` forward+backward (the custom VJP: gmm
for d(lhs), tgmm for d(rhs)) at m=8192, k=512, n=1024 with group sizes drawn
from Dirichlet(2) over G groups, for G=8 and G=64, against

  - the FLOP-matched dense matmul's forward+backward ([m, k] x [k, n] and
    the two products of its VJP, float32 accumulation), and
  - the same gmm on a quarter-full buffer (sum(group_sizes) = m/4, the same
    Dirichlet proportions), whose time is divided by the full buffer's,

all three in the same rounds of the same process (`tools/timing.py`). It
prints one row per G, the targets (<= 1.25x dense at G=8, <= 1.5x at G=64,
quarter-full <= 0.4x of full), the malloc settings `import pallas_kernels`
applied, and the minor page faults per full-buffer call.

  python tools/bench_gmm_plain.py
  python - < tools/bench_gmm_plain.py          # the same, as a script on stdin
  python tools/bench_gmm_plain.py --processes 5  # 5 fresh processes, then a summary
  MOEJAX_HUGEPAGES=0 python tools/bench_gmm_plain.py  # without the malloc settings
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys

import pallas_kernels as pk  # first, as a user would: before JAX computes anything
from pallas_kernels import cpu_env

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
  _SCRIPT = pathlib.Path(__file__).resolve()
  sys.path.insert(0, str(_SCRIPT.parent))
except NameError:  # a script on stdin: run from the repository root
  _SCRIPT = None
  sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
from timing import time_interleaved  # noqa: E402

M, K, N = 8192, 512, 1024
TARGETS = {8: 1.25, 64: 1.5}  # fwd+bwd x dense
QUARTER_TARGET = 0.4  # quarter-full fwd+bwd x full


def dirichlet_sizes(live: int, groups: int, seed: int, alpha: float = 2.0) -> np.ndarray:
  """Group sizes summing to `live`, proportions from Dirichlet(alpha)."""
  p = np.random.default_rng(seed).dirichlet(np.full(groups, alpha))
  sizes = np.floor(p * live).astype(np.int32)
  sizes[np.argmax(sizes)] += live - sizes.sum()
  return sizes


def _dot(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())),
                             preferred_element_type=jnp.float32)


def dense_fwd_bwd(x, w, dy):
  """The three matmuls of x @ w's forward+backward."""
  return _dot(x, w, ((1,), (0,))), _dot(dy, w, ((1,), (1,))), _dot(x, dy, ((0,), (0,)))


def gmm_fwd_bwd(sizes):
  def run(x, w, dy):
    out, vjp = jax.vjp(lambda a, b: pk.gmm(a, b, sizes, backend="cpu"), x, w)
    return (out, *vjp(dy))
  return jax.jit(run)


def minor_faults_per_call(fn, args, calls: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    jax.block_until_ready(fn(*args))
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def measure(groups_list, repeats: int, warmup: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
  rows = {}
  for groups in groups_list:
    w = jnp.asarray(rng.standard_normal((groups, K, N)) / np.sqrt(K), jnp.float32)
    full = jnp.asarray(dirichlet_sizes(M, groups, seed + groups))
    quarter = jnp.asarray(dirichlet_sizes(M // 4, groups, seed + groups))
    fns = {"dense": (jax.jit(dense_fwd_bwd), (x, w[0], dy)),
           "full": (gmm_fwd_bwd(full), (x, w, dy)),
           "quarter": (gmm_fwd_bwd(quarter), (x, w, dy))}
    t = time_interleaved(fns, repeats, warmup=warmup)
    rows[groups] = {
        "dense_ms": t["dense"] * 1e3, "full_ms": t["full"] * 1e3,
        "quarter_ms": t["quarter"] * 1e3,
        "x_dense": t["full"] / t["dense"], "quarter_x_full": t["quarter"] / t["full"],
        "faults_per_call": minor_faults_per_call(*fns["full"]),
        "sizes_min_max": [int(full.min()), int(full.max())]}
  return rows


def _print_rows(rows: dict) -> None:
  print("| G | dense fwd+bwd ms | gmm fwd+bwd ms | x dense (target) | quarter-full ms "
        "| x full (target) | minor faults / call |")
  print("|---|---|---|---|---|---|---|")
  for groups, r in rows.items():
    print(f"| {groups} | {r['dense_ms']:.1f} | {r['full_ms']:.1f} | {r['x_dense']:.2f} "
          f"(<= {TARGETS[int(groups)]}) | {r['quarter_ms']:.1f} | {r['quarter_x_full']:.2f} "
          f"(<= {QUARTER_TARGET}) | {r['faults_per_call']:.0f} |", flush=True)


def _summary(runs: list[dict]) -> None:
  print(f"\n{len(runs)} fresh processes: min / median / max")
  for groups in runs[0]:
    for key, target in (("x_dense", TARGETS[int(groups)]), ("quarter_x_full", QUARTER_TARGET)):
      vals = [r[groups][key] for r in runs]
      met = sum(v <= target for v in vals)
      print(f"  G={groups} {key:<15} {min(vals):.2f} / {statistics.median(vals):.2f} / "
            f"{max(vals):.2f}   <= {target}: {met} of {len(vals)}   "
            f"({', '.join(f'{v:.2f}' for v in vals)})")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--groups", default="8,64")
  ap.add_argument("--repeats", type=int, default=11)
  ap.add_argument("--warmup", type=int, default=4,
                  help="untimed rounds first (a fresh process runs its first calls slower)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--processes", type=int, default=0,
                  help="run the measurement in this many fresh processes, then summarise")
  ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  groups_list = [int(g) for g in args.groups.split(",")]
  if any(g not in TARGETS for g in groups_list):
    raise SystemExit(f"--groups: each of {sorted(TARGETS)}")
  if args.processes:
    if _SCRIPT is None:
      raise SystemExit("--processes needs the script as a file")
    print(f"# bench_gmm_plain  jax={jax.__version__}  malloc settings: {cpu_env.applied}")
    runs = []
    for _ in range(args.processes):
      out = subprocess.run(
          [sys.executable, str(_SCRIPT), "--json", "--groups", args.groups,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--seed", str(args.seed)], check=True, capture_output=True, text=True).stdout
      runs.append(json.loads(out.strip().splitlines()[-1]))
      _print_rows(runs[-1])
    _summary(runs)
    return
  rows = measure(groups_list, args.repeats, args.warmup, args.seed)
  if args.json:
    print(json.dumps(rows))
    return
  print(f"# bench_gmm_plain  platform={jax.default_backend()} jax={jax.__version__} "
        f"m={M} k={K} n={N} float32 Dirichlet(2) sizes, {args.repeats} rounds")
  print(f"# malloc settings applied by `import pallas_kernels`: {cpu_env.applied}, "
        f"heap marked for huge pages: {cpu_env.heap_reserved >> 20} MiB")
  _print_rows(rows)


if __name__ == "__main__":
  main()
