"""Convert between Hugging Face checkpoints and moejax run directories (docs/checkpoints.md).

  python tools/convert.py from-hf HF_DIR RUN_DIR [--set train.batch_size=8 ...]
  python tools/convert.py to-hf RUN_DIR HF_DIR [--step N] [--model-type mixtral]

from-hf writes config.json + checkpoints/0 (continue with
`python -m experiments --workdir RUN_DIR --config.train.steps=N`); to-hf
writes config.json + safetensors for transformers' from_pretrained.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("from-hf", help="HF checkpoint directory -> moejax run directory")
  a.add_argument("hf_dir")
  a.add_argument("run_dir")
  a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config keys that do not change the model (train.*, data.*, ...)")
  b = sub.add_parser("to-hf", help="moejax run directory -> HF checkpoint directory")
  b.add_argument("run_dir")
  b.add_argument("hf_dir")
  b.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: newest)")
  b.add_argument("--model-type", default=None, help="HF family (default: the run's source "
                 "family, else the first that holds the model)")
  b.add_argument("--max-shard-gb", type=float, default=2.0)
  args = p.parse_args(argv)

  from moejax.interop import ConversionError, from_hf, parse_overrides, to_hf  # noqa: PLC0415
  from moejax.train import data as data_lib  # noqa: PLC0415
  try:
    overrides = parse_overrides(args.set) if args.cmd == "from-hf" else {}
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  try:
    if args.cmd == "from-hf":
      cfg = from_hf(args.hf_dir, args.run_dir, overrides)
      print(f"wrote {args.run_dir}: {cfg.name}, {cfg.model.num_layers} layers, "
            f"vocab {cfg.model.vocab_size}")
      if cfg.data.tokenizer not in ("", "bytes"):
        print(f"tokenizer: {cfg.data.tokenizer} (data.tokenizer)")
      elif cfg.model.vocab_size < data_lib.VOCAB_SIZE:
        print(f"note: training with moejax's byte-level data needs model.vocab_size >= "
              f"{data_lib.VOCAB_SIZE}; the checkpoint has no tokenizer.json to train on text with (docs/checkpoints.md)")
    else:
      hf = to_hf(args.run_dir, args.hf_dir, step=args.step, model_type=args.model_type,
                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
      print(f"wrote {args.hf_dir}: model_type {hf['model_type']}")
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
