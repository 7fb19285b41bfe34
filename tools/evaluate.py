"""Score a run's checkpoint on a JSONL file: mean NLL, tokens and bits per byte.

    python tools/evaluate.py --run RUN_DIR --data FILE.jsonl [--step N] [--json OUT] \
        [--skip-threshold TAU] [--k 1,2,4]

Each line of FILE is {"text": "..."} (tokenized with the run's data.tokenizer,
its BOS/EOS rules applied) or {"tokens": [ids]} (used exactly as given: the NLL
is that of ids[1:] given their prefixes, what transformers computes with
labels=ids). Prints and, with --json, writes {"mean_nll": nats per predicted
token, "tokens": predicted tokens, "bits_per_byte": text files only}. A
checkpoint converted with tools/convert.py scores what it scores in
transformers (tests/eval). --skip-threshold TAU scores with dynamic expert
skipping (moe.skip_threshold, moejax/moe/skipping.py: a token's choices with
combine weight below TAU are not computed, except its heaviest) and adds
"skip_threshold", "expert_calls" and "skipped_fraction" (measured over the
real tokens of every MoE layer, against moe.top_k calls per token). --k K1,K2,...
scores the run once per number of experts per token (a self-slimmable SMoE-Dropout
run at moe.smoe_dropout.eval_k = K, any other router at moe.top_k = K) and adds
"by_k": [{"k", "mean_nll", "tokens", "bits_per_byte"}, ...]; the top-level numbers
stay those of the run's own setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def k_configs(cfg, spec: str) -> list:
  """[(k, cfg at k experts per token)] for --k `spec`; ValueError naming --k for bad k."""
  from moejax.checks import ConfigError  # noqa: PLC0415
  from moejax.validation import validate  # noqa: PLC0415

  try:
    ks = [int(v) for v in spec.split(",") if v.strip()]
  except ValueError:
    ks = []
  if not ks or min(ks) < 1:
    raise ValueError(f"--k {spec!r}: allowed: comma-separated positive integers, e.g. 1,2,4")
  if not cfg.moe.enabled:
    raise ValueError(f"--k {spec!r}: the run is a dense model (moe.enabled=False)")
  out = []
  for k in ks:
    c = cfg.copy_and_resolve_references()
    if c.moe.router == "smoe_dropout":
      c.moe.smoe_dropout.eval_k = k
    else:
      c.moe.top_k = k
    try:
      validate(c)
    except ConfigError as e:
      raise ValueError(f"--k {k}: {e}") from None
    out.append((k, c))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
  p.add_argument("--data", required=True, help='JSONL: {"text": ...} or {"tokens": [...]} lines')
  p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: newest)")
  p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
  p.add_argument("--json", default=None, metavar="OUT", help="also write the result here")
  p.add_argument("--skip-threshold", type=float, default=None, metavar="TAU",
                 help="dynamic expert skipping: skip choices below this weight, in [0, 1)")
  p.add_argument("--k", default=None, metavar="K1,K2,...",
                 help="also score at these experts per token (comma-separated integers)")
  args = p.parse_args(argv)

  from moejax.eval import read_jsonl, score  # noqa: PLC0415
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from moejax.train import tokenizer as tok_lib  # noqa: PLC0415

  try:
    if not os.path.exists(os.path.join(args.run, "config.json")):
      raise ValueError(f"--run {args.run!r} is not a run directory (no config.json)")
    cfg = run_config(args.run)
    if args.skip_threshold is not None:
      from moejax.checks import ConfigError  # noqa: PLC0415
      from moejax.validation import validate  # noqa: PLC0415

      cfg.moe.skip_threshold = args.skip_threshold
      try:
        validate(cfg)
      except ConfigError as e:
        raise ValueError(f"--skip-threshold {args.skip_threshold}: {e}") from None
    tok = tok_lib.get(cfg.data.get("tokenizer", tok_lib.BYTES))
    records = read_jsonl(args.data, tok, cfg.model.vocab_size)
    params, collections, step = load_run(args.run, args.step)
    variables = {"params": params, **collections}
    result = score(cfg, variables, records, args.batch_size)
    by_k = {}
    if args.k is not None:
      by_k = {"by_k": [{"k": k, **score(cfg_k, variables, records, args.batch_size).summary()}
                       for k, cfg_k in k_configs(cfg, args.k)]}
    skipping = {}
    if args.skip_threshold is not None:
      from moejax.eval.expert_calls import skipped_calls  # noqa: PLC0415

      skipping = {"skip_threshold": args.skip_threshold,
                  **skipped_calls(cfg, variables, [r.ids for r in records], args.batch_size)}
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = {**result.summary(), "records": len(records), "step": int(step), **skipping, **by_k}
  print(json.dumps(out))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
