"""Capture a routing trace of a run evaluated on its validation split or on texts.

    python tools/capture_trace.py --run RUN_DIR --out TRACE.npz [--step N]
        [--split val|train] [--batches N] [--texts FILE.jsonl] [--no-probs]

The trace (moejax/inference/trace.py) records per token and MoE layer the
chosen experts and their combine weights, the token ids and positions, and
the router probabilities (float16; --no-probs leaves them out), for the
offloading and placement simulators (tools/simulate_offload.py,
tools/simulate_placement.py) and the routing analyses. --texts reads one
{"text": ...} per line, each cut into rows of the run's train.seq_len.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _texts(path: str) -> list[str]:
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"--texts {path!r} line {n} is not JSON ({e.msg})") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"--texts {path!r} line {n} must be {{\"text\": \"...\"}}")
      out.append(obj["text"])
  if not out:
    raise ValueError(f"--texts {path!r} holds no text")
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
  p.add_argument("--out", required=True, metavar="TRACE.npz")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--split", default="val", choices=("val", "train"))
  p.add_argument("--batches", type=int, default=None,
                 help="batches of train.batch_size windows (default: train.eval_batches)")
  p.add_argument("--texts", default=None, metavar="FILE.jsonl", help="trace these texts instead")
  p.add_argument("--no-probs", action="store_true", help="do not store router probabilities")
  args = p.parse_args(argv)

  from moejax.analysis import routing as routing_lib  # noqa: PLC0415
  from moejax.inference import trace as trace_lib  # noqa: PLC0415

  try:
    if args.batches is not None and args.batches < 1:
      raise ValueError(f"--batches {args.batches} must be >= 1")
    model = routing_lib.load_model(args.run, args.step)
    if args.texts:
      t = trace_lib.capture(model, _texts(args.texts))
    else:
      t = trace_lib.capture(model, args.split, num_batches=args.batches)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.no_probs:
    t.probs_TxNxE = None
  trace_lib.save(args.out, t)
  print(json.dumps({"tokens": t.num_tokens, "layers": t.layers, "num_experts": t.num_experts,
                    "sequences": int(len(set(t.sequence_T.tolist()))), "out": args.out}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
