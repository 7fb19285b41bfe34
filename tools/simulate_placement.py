"""Compare expert placements for expert parallelism over a routing trace.

    python tools/simulate_placement.py --trace FILE --devices D
        [--methods round_robin,greedy,milp,replicate_hot] [--replicas R]
        [--train-fraction 0.5] [--dtype-bytes 2] [--milp-time-limit S]
        [--milp-max-experts E] [--json OUT]

FILE is a trace of tools/capture_trace.py or tools/generate.py --trace.
Placements are made from the first --train-fraction of its sequences and
scored on the rest (moejax/inference/placement.py describes the methods and
the numbers). D must divide the E experts per layer. --replicas R: extra
expert copies per layer for replicate_hot (default D; 0 for D = 1). A token's home device
is its sequence index % D. milp falls back to greedy above --milp-max-experts
experts per layer (default 32) and keeps the greedy's placement where that
beats its best at --milp-time-limit seconds per layer (default 10); its note
says which was used. Prints a table; --json writes the list of rows
{"method", "devices", "replicas", "a2a_bytes_per_token_layer",
"a2a_bytes_per_token", "load_imbalance", "devices_per_token", "note"}.
Exit status 2 with "error: ..." on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def table(rows: list[dict]) -> str:
  """The rows as aligned text columns."""
  head = ("method", "a2a_bytes/token/layer", "load_imbalance", "devices/token", "note")
  body = [(r["method"], f"{r['a2a_bytes_per_token_layer']:.1f}", f"{r['load_imbalance']:.3f}",
           f"{r['devices_per_token']:.3f}", r["note"]) for r in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in [head, *body])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trace", required=True, metavar="FILE", help="routing trace (.npz)")
  p.add_argument("--devices", type=int, required=True, help="expert-parallel devices D")
  p.add_argument("--methods", default="round_robin,greedy,milp,replicate_hot",
                 help="comma-separated placement methods")
  p.add_argument("--replicas", type=int, default=None,
                 help="extra expert copies per layer for replicate_hot (default: D)")
  p.add_argument("--train-fraction", type=float, default=0.5,
                 help="share of the sequences the placements are made from")
  p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per activation value")
  p.add_argument("--milp-time-limit", type=float, default=10.0, help="seconds per layer")
  p.add_argument("--milp-max-experts", type=int, default=32,
                 help="above this many experts per layer milp falls back to greedy")
  p.add_argument("--json", default=None, metavar="OUT", help="also write the rows here")
  args = p.parse_args(argv)

  from moejax.inference import placement  # noqa: PLC0415
  from moejax.inference import trace as trace_lib  # noqa: PLC0415

  try:
    try:
      trace = trace_lib.load(args.trace)
    except ValueError as e:
      raise ValueError(f"--trace: {e}") from None
    trace_lib.expert_shape(trace.model, "--trace")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in placement.METHODS]
    if bad or not methods:
      raise ValueError(f"--methods {args.methods!r}: {', '.join(bad) or 'empty'}; allowed: "
                       + ", ".join(placement.METHODS))
    placement.check_devices(args.devices, trace.num_experts, "--devices")
    replicas = (placement.default_replicas(args.devices, trace.num_experts)
                if args.replicas is None else args.replicas)
    placement.check_replicas(replicas, trace.num_experts, args.devices, "--replicas")
    if not 0 < args.train_fraction < 1:
      raise ValueError(f"--train-fraction {args.train_fraction}; allowed: a number in (0, 1)")
    if args.dtype_bytes < 1:
      raise ValueError(f"--dtype-bytes {args.dtype_bytes}; allowed: an integer >= 1")
    if not args.milp_time_limit > 0:
      raise ValueError(f"--milp-time-limit {args.milp_time_limit}; allowed: seconds > 0")
    if args.milp_max_experts < 1:
      raise ValueError(f"--milp-max-experts {args.milp_max_experts}; allowed: an integer >= 1")
    rows = placement.evaluate(trace, args.devices, methods, replicas=replicas,
                              train_fraction=args.train_fraction, dtype_bytes=args.dtype_bytes,
                              milp_time_limit=args.milp_time_limit,
                              milp_max_experts=args.milp_max_experts)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"trace {args.trace}: {trace.num_tokens} tokens, {trace.num_layers} MoE layers x "
        f"{trace.num_experts} experts on {args.devices} devices; placed from the first "
        f"{args.train_fraction:g} of the sequences, scored on the rest; home device: sequence "
        f"index % {args.devices}; replicate_hot: {replicas} replicas per layer")
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
