"""Compress a trained MoE run after training into a new run directory (moejax/compress).

    python tools/compress.py --run RUN_DIR --method prune \
        --criterion {frequency,gate_weight,output_error,random} --remove FRACTION \
        [--seed S] [--calib DATA] [--calib-batches N] [--calib-tokens S] [--step N] \
        --out OUT_DIR

Calibrates on N batches of train.batch_size rows (default train.eval_batches)
of DATA ("val" by default: the run's validation split, the rows
moejax.analysis.capture reads; "train"; or a .jsonl file of {"text"} lines,
a .txt file or a directory of them, read like data.path) and prunes
round(FRACTION * moe.num_experts) experts from every MoE layer. --method
names the compression; only "prune" exists so far. OUT_DIR is an
ordinary run directory (config.json with the new moe.num_experts, a step-0
checkpoint with fresh optimizer state), so tools/evaluate.py, moejax.analysis
and `python -m experiments --workdir OUT_DIR` (fine-tuning) accept it, plus
compress.json: {"steps": [...]}, one entry per compression applied so far
(method, options, the experts removed and kept per layer, kept_original =
indices in the first run, calibration statistics). Methods compose by running
this tool on OUT_DIR again. Bad input: `error: ...` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("prune",)
REPORT = "compress.json"


def _previous_steps(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, REPORT)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(json.load(f)["steps"])


def _share(part, total) -> float:
  return float(part / total) if total > 0 else 0.0


def prune_step(args, cfg, calib, pruned, source_step: int, previous: list[dict]) -> dict:
  """The compress.json entry of one pruning."""
  import numpy as np  # noqa: PLC0415

  prev_kept = previous[-1]["kept_original"] if previous else None
  step = {"method": "prune", "criterion": args.criterion, "remove": args.remove,
          "seed": args.seed, "calib": args.calib, "calib_batches": args.calib_batches,
          "calib_tokens": args.calib_tokens, "source_run": os.path.abspath(args.run),
          "source_step": int(source_step), "num_experts_before": cfg.moe.num_experts,
          "num_experts_after": pruned.cfg.moe.num_experts,
          "removed_per_layer": int(pruned.removed_NxR.shape[1]),
          "removed": {}, "kept": {}, "kept_original": {}, "removed_share": {}}
  for i, layer in enumerate(pruned.layers):
    key = str(layer)
    rm, kept = pruned.removed_NxR[i], pruned.kept_NxK[i]
    step["removed"][key] = rm.tolist()
    step["kept"][key] = kept.tolist()
    step["kept_original"][key] = ([prev_kept[key][j] for j in kept] if prev_kept
                                  else kept.tolist())
    step["removed_share"][key] = {
        "tokens": _share(calib.counts_NxE[i, rm].sum(), calib.counts_NxE[i].sum()),
        "gate_weight": _share(calib.gate_NxE[i, rm].sum(), calib.gate_NxE[i].sum())}
  if pruned.order_NxR is not None:
    step["removal_order"] = {str(l): pruned.order_NxR[i].tolist()
                             for i, l in enumerate(pruned.layers)}
    step["output_error"] = {str(l): np.asarray(pruned.errors_NxR[i]).tolist()
                            for i, l in enumerate(pruned.layers)}
  step["calibration"] = calib.summary()
  return step


def compress(args) -> dict:
  """Writes OUT_DIR; returns this compression's compress.json entry."""
  from moejax.analysis import Model  # noqa: PLC0415
  from moejax.compress import CRITERIA, calibrate, prune  # noqa: PLC0415
  from moejax.compress.prune import check_options  # noqa: PLC0415
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from moejax.train import trainer  # noqa: PLC0415

  if not os.path.exists(os.path.join(args.run, "config.json")):
    raise ValueError(f"--run {args.run!r} is not a run directory (no config.json)")
  if os.path.abspath(args.out) == os.path.abspath(args.run):
    raise ValueError(f"--out {args.out!r} is the --run directory; give a new one")
  for name in ("config.json", "checkpoints"):
    if os.path.exists(os.path.join(args.out, name)):
      raise ValueError(f"--out {args.out!r} already holds {name}; give a new directory")
  if args.method not in METHODS:
    raise ValueError(f"--method {args.method!r} is not implemented; allowed: {list(METHODS)}")
  if args.criterion not in CRITERIA:
    raise ValueError(f"--criterion {args.criterion!r} is not a pruning criterion; allowed: "
                     f"{list(CRITERIA)}")
  if args.calib_batches is not None and args.calib_batches < 1:
    raise ValueError(f"--calib-batches {args.calib_batches} is invalid: must be >= 1")
  if args.calib_tokens < 1:
    raise ValueError(f"--calib-tokens {args.calib_tokens} is invalid: must be >= 1")
  if args.seed < 0:
    raise ValueError(f"--seed {args.seed} is invalid: must be >= 0")
  cfg = run_config(args.run)
  check_options(cfg, args.criterion, args.remove, args.seed, "--remove")  # before any reading
  params, collections, source_step = load_run(args.run, args.step)
  variables = {"params": params, **collections}
  calib = calibrate(Model(cfg, variables, int(source_step)), args.calib,
                    num_batches=args.calib_batches, max_tokens=args.calib_tokens,
                    seed=args.seed)
  pruned = prune(cfg, variables, args.criterion, args.remove, calib, args.seed)
  previous = _previous_steps(args.run)
  step = prune_step(args, cfg, calib, pruned, source_step, previous)
  trainer.write_run(pruned.cfg, pruned.variables, args.out)
  with open(os.path.join(args.out, REPORT), "w") as f:
    json.dump({"steps": previous + [step]}, f, indent=1)
    f.write("\n")
  return step


def summary_lines(step: dict, out: str) -> list[str]:
  lines = [f"pruned {step['removed_per_layer']} of {step['num_experts_before']} experts per "
           f"layer ({step['criterion']}): moe.num_experts {step['num_experts_before']} -> "
           f"{step['num_experts_after']}; calibration: {step['calibration']['tokens']} tokens "
           f"of {step['calibration']['data']}"]
  for layer, removed in step["removed"].items():
    share = step["removed_share"][layer]
    lines.append(f"  layer {layer}: removed {removed} (their share: tokens "
                 f"{100 * share['tokens']:.1f}%, gate weight {100 * share['gate_weight']:.1f}%)")
  lines.append(f"wrote {out} ({REPORT}); evaluate with tools/evaluate.py --run {out}, "
               f"fine-tune with python -m experiments --workdir {out}")
  return lines


def main(argv: list[str] | None = None) -> int:
  from moejax.compress import CRITERIA  # noqa: PLC0415
  from moejax.compress.calibrate import DEFAULT_MAX_TOKENS  # noqa: PLC0415

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
  p.add_argument("--method", required=True, help=f"compression method: {', '.join(METHODS)}")
  p.add_argument("--criterion", required=True,
                 help=f"which experts go (prune): {', '.join(CRITERIA)}")
  p.add_argument("--remove", required=True, type=float,
                 help="fraction of each layer's experts to remove, in (0, 1)")
  p.add_argument("--seed", type=int, default=0, help="random criterion; sampled inputs")
  p.add_argument("--calib", default="val",
                 help="'val', 'train', or a .txt/.jsonl file or directory (default: val)")
  p.add_argument("--calib-batches", type=int, default=None,
                 help="calibration batches of train.batch_size rows (default "
                      "train.eval_batches)")
  p.add_argument("--calib-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                 help="layer inputs kept per layer for output_error (tokens)")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: newest)")
  p.add_argument("--out", required=True, help="new run directory")
  args = p.parse_args(argv)
  try:
    from absl import logging  # noqa: PLC0415
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes
  except ImportError:
    pass
  try:
    step = compress(args)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(summary_lines(step, args.out)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
