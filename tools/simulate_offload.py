"""Simulate expert offloading (experts in host memory, a GPU cache of them) over a routing trace.

    python tools/simulate_offload.py --trace FILE [--run RUN_DIR] [--cache-sizes 2,4,8]
        [--scope {layer,global}] [--policies lru,lfu,score_ema,belady,...]
        [--train-fraction 0.5] [--bandwidth-gbps G] [--gpu NAME] [--tflops X]
        [--dtype-bytes 2] [--decay D] [--prefetch-k P] [--json OUT]

FILE is a trace of tools/capture_trace.py or tools/generate.py --trace; with
--run, the trace must come from that run's model (error otherwise). The
first --train-fraction of its sequences fit the prefetchers; every policy is
replayed on the rest (moejax/inference/offload.py describes the policies and
the latency model). --cache-sizes counts experts per layer (--scope layer)
or in total (--scope global); default: K, 2K, 4K, ... and all experts, K
being the most experts a token uses in one layer. --policies default: all of
lru, lfu, score_ema, belady, lru+prefetch_affinity, lru+prefetch_predictor.
--gpu picks the dense bf16 TFLOP/s (rtx4090 165, a100 312, h100 989;
--tflops overrides it); --bandwidth-gbps is the host link (default 25 GB/s,
PCIe 4.0 x16 effective); --dtype-bytes the bytes per expert weight. Prints a
table; --json writes the list of rows {"policy", "cache_size", "scope",
"hit_rate", "bytes_moved", "latency_ms_per_token", "prefetch_accuracy",
"prefetch_recall", ...}. Exit status 2 with "error: ..." on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_POLICIES = "lru,lfu,score_ema,belady,lru+prefetch_affinity,lru+prefetch_predictor"


def _ints(flag: str, text: str) -> list[int]:
  try:
    out = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{flag} {text!r} is not a comma-separated list of integers") from None
  if not out:
    raise ValueError(f"{flag} {text!r} is empty; allowed: a comma-separated list of integers")
  return out


def default_sizes(lo: int, hi: int) -> list[int]:
  """lo, 2 lo, 4 lo, ... below hi, then hi."""
  out, c = [], lo
  while c < hi:
    out.append(c)
    c *= 2
  return out + [hi]


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
  """The rows as aligned text columns."""
  head = ("policy", "cache", "scope", "hit_rate", "MB_moved", "ms/token", "prefetch_acc",
          "prefetch_recall")
  body = [(r["policy"], str(r["cache_size"]), r["scope"], _fmt(r["hit_rate"], ".4f"),
           _fmt(r["bytes_moved"] / 1e6, ".4g"), _fmt(r["latency_ms_per_token"], ".4g"),
           _fmt(r["prefetch_accuracy"], ".3f"), _fmt(r["prefetch_recall"], ".3f"))
          for r in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in [head, *body])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trace", required=True, metavar="FILE", help="routing trace (.npz)")
  p.add_argument("--run", default=None, metavar="RUN_DIR",
                 help="check that the trace comes from this run's model")
  p.add_argument("--cache-sizes", default=None, help="comma-separated cache sizes (experts)")
  p.add_argument("--scope", default="layer", choices=("layer", "global"))
  p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policies")
  p.add_argument("--train-fraction", type=float, default=0.5,
                 help="share of the sequences that fit the prefetchers")
  p.add_argument("--bandwidth-gbps", type=float, default=None,
                 help="host -> GPU GB/s (default 25: PCIe 4.0 x16 effective)")
  p.add_argument("--gpu", default="rtx4090", help="GPU whose dense bf16 TFLOP/s to use")
  p.add_argument("--tflops", type=float, default=None, help="dense TFLOP/s (overrides --gpu)")
  p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per expert weight")
  p.add_argument("--decay", type=float, default=0.9, help="score_ema decay per token")
  p.add_argument("--prefetch-k", type=int, default=None,
                 help="experts prefetched per token and layer (default: K)")
  p.add_argument("--json", default=None, metavar="OUT", help="also write the rows here")
  args = p.parse_args(argv)

  from moejax.inference import offload  # noqa: PLC0415
  from moejax.inference import trace as trace_lib  # noqa: PLC0415

  try:
    try:
      trace = trace_lib.load(args.trace)
    except ValueError as e:
      raise ValueError(f"--trace: {e}") from None
    if args.run is not None:
      from moejax.init.sources import run_config  # noqa: PLC0415

      if not os.path.exists(os.path.join(args.run, "config.json")):
        raise ValueError(f"--run {args.run!r} is not a run directory (no config.json)")
      trace_lib.check_model(trace, run_config(args.run), "--trace")
    trace_lib.expert_shape(trace.model, "--trace")
    for flag, v in (("--bandwidth-gbps", args.bandwidth_gbps), ("--tflops", args.tflops),
                    ("--dtype-bytes", args.dtype_bytes)):
      if v is not None and not v > 0:
        raise ValueError(f"{flag} {v}; allowed: a positive number")
    if not 0 <= args.decay < 1:
      raise ValueError(f"--decay {args.decay}; allowed: a number in [0, 1)")
    if not 0 < args.train_fraction < 1:
      raise ValueError(f"--train-fraction {args.train_fraction}; allowed: a number in (0, 1)")
    if args.prefetch_k is not None and not 1 <= args.prefetch_k <= trace.num_experts:
      raise ValueError(f"--prefetch-k {args.prefetch_k}; allowed: an integer in "
                       f"[1, {trace.num_experts}]")
    hw = offload.hardware(args.gpu, tflops=args.tflops, bandwidth_gbps=args.bandwidth_gbps,
                          dtype_bytes=args.dtype_bytes, arg_name="--gpu")
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not policies:
      raise ValueError(f"--policies {args.policies!r} is empty; allowed: "
                       + ", ".join(offload.POLICIES))
    for name in policies:
      offload.check_policy(name, "--policies")
    lo, hi = offload.cache_limits(trace, args.scope)
    sizes = (default_sizes(lo, hi) if args.cache_sizes is None
             else _ints("--cache-sizes", args.cache_sizes))
    for c in sizes:
      offload.check_cache_size(c, trace, args.scope, "--cache-sizes")
    rows = offload.evaluate(trace, sizes, policies, scope=args.scope,
                            train_fraction=args.train_fraction, hw=hw, decay=args.decay,
                            prefetch_k=args.prefetch_k)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  bpe = trace_lib.bytes_per_expert(trace.model, hw.dtype_bytes)
  print(f"trace {args.trace}: {trace.num_tokens} tokens ({rows[0]['tokens']} replayed after "
        f"fitting on the first {args.train_fraction:g} of the sequences), {trace.num_layers} MoE "
        f"layers x {trace.num_experts} experts, K={lo}; {bpe / 1e6:.4g} MB per expert; "
        f"{hw.tflops:g} TFLOP/s, {hw.bandwidth_gbps:g} GB/s link; compute alone "
        f"{rows[0]['compute_ms_per_token']:.4g} ms/token")
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
