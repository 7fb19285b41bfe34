"""Compress a trained MoE run after training into a new run directory (moejax/compress).

    python tools/compress.py --run RUN_DIR --method METHOD [method options] \
        [--seed S] [--calib DATA] [--calib-batches N] [--calib-tokens S] [--step N] \
        --out OUT_DIR

    --method prune --criterion {frequency,gate_weight,output_error,random} --remove FRACTION
    --method merge --to N [--no-align] [--group-by {router_logits,weights}]
                   [--align-by {weights,activations}]
    --method quantize (--bits {8,4,2} | --avg-bits B) [--scheme {sym,asym,fp8}] [--group-size G]
    --method distill --teacher TEACHER_RUN --steps N [--temperature T] [--alpha A] [--lr LR]
        [--warmup-steps W]   (trains OUT_DIR; moejax/compress/distill.py)
    --method latent --rank R   (SwiGLU experts -> moe.expert='latent'; moejax/compress/latent.py)

`--help` lists every method (moejax.compress.METHODS) with its options; an
option of another method is refused by name. Methods that need calibration
run the model over N batches of train.batch_size rows (default
train.eval_batches) of DATA ("train" by default: rows of the run's training
split; "val": its validation split, the rows moejax.analysis.capture reads
and the trainer scores; or a .jsonl file of {"text"} lines, a .txt file or a
directory of them, read like data.path).
OUT_DIR is an ordinary run directory (config.json, a step-0 checkpoint with
fresh optimizer state), so tools/evaluate.py, tools/generate.py,
moejax.analysis and `python -m experiments --workdir OUT_DIR` (fine-tuning)
accept it, plus compress.json: {"steps": [...]}, one entry per compression
applied so far (method, its options and what it did, the source run and
step, calibration statistics). Methods compose by running this tool on
OUT_DIR again. Bad input: `error: ...` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPORT = "compress.json"


def _previous_steps(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, REPORT)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(json.load(f)["steps"])


def _methods() -> dict:
  from moejax.compress import METHODS  # noqa: PLC0415
  return METHODS


def _check_options(args, method) -> None:
  """Options of another method are refused by name, not silently ignored."""
  for other in _methods().values():
    if other is method:
      continue
    for o in other.options:
      if o.flag not in method.flags() and getattr(args, o.dest, None) is not None:
        raise ValueError(f"{o.flag} is an option of --method {other.name}; --method "
                         f"{method.name} takes: {sorted(method.flags()) or 'no own options'}")
  for o in method.options:
    if o.kwargs.get("required") and getattr(args, o.dest) is None:
      raise ValueError(f"--method {method.name} needs {o.flag}")


def compress(args) -> dict:
  """Writes OUT_DIR; returns this compression's compress.json entry."""
  from moejax.analysis import Model  # noqa: PLC0415
  from moejax.compress import calibrate  # noqa: PLC0415
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from moejax.train import trainer  # noqa: PLC0415

  methods = _methods()
  if not os.path.exists(os.path.join(args.run, "config.json")):
    raise ValueError(f"--run {args.run!r} is not a run directory (no config.json)")
  if os.path.abspath(args.out) == os.path.abspath(args.run):
    raise ValueError(f"--out {args.out!r} is the --run directory; give a new one")
  for name in ("config.json", "checkpoints"):
    if os.path.exists(os.path.join(args.out, name)):
      raise ValueError(f"--out {args.out!r} already holds {name}; give a new directory")
  if args.method not in methods:
    raise ValueError(f"--method {args.method!r} is not implemented; allowed: {list(methods)}")
  method = methods[args.method]
  _check_options(args, method)
  if args.calib_batches is not None and args.calib_batches < 1:
    raise ValueError(f"--calib-batches {args.calib_batches} is invalid: must be >= 1")
  if args.calib_tokens < 1:
    raise ValueError(f"--calib-tokens {args.calib_tokens} is invalid: must be >= 1")
  if args.seed < 0:
    raise ValueError(f"--seed {args.seed} is invalid: must be >= 0")
  cfg = run_config(args.run)
  method.check(cfg, args)  # before any reading
  params, collections, source_step = load_run(args.run, args.step)
  variables = {"params": params, **collections}
  calib = None
  if method.calibrates(args):
    calib = calibrate(Model(cfg, variables, int(source_step)), args.calib,
                      num_batches=args.calib_batches, max_tokens=args.calib_tokens,
                      seed=args.seed)
  previous = _previous_steps(args.run)
  result = method.apply(cfg, variables, calib, args, previous)
  if method.name != "distill" and result.cfg.train.distill.teacher:
    # A distilled source run's teacher is not this run's: fine-tuning OUT_DIR with
    # `python -m experiments` trains on the LM loss unless distilled again.
    result.cfg = ml_collections.ConfigDict(result.cfg.to_dict())
    result.cfg.train.distill.teacher = ""
  step = {"method": method.name, **result.entry, "source_run": os.path.abspath(args.run),
          "source_step": int(source_step)}
  if calib is not None:
    step.update(calib=args.calib, calib_batches=args.calib_batches,
                calib_tokens=args.calib_tokens, calibration=calib.summary())
  trainer.write_run(result.cfg, result.variables, args.out)
  for stem, array in result.arrays.items():
    np.save(os.path.join(args.out, f"{stem}.npy"), array)
  _write_report(args.out, previous + [step])
  if method.after_write is not None:  # e.g. distillation: trains in OUT_DIR
    step.update(method.after_write(args.out, args))
    _write_report(args.out, previous + [step])
  return step


def _write_report(out: str, steps: list[dict]) -> None:
  with open(os.path.join(out, REPORT), "w") as f:
    json.dump({"steps": steps}, f, indent=1)
    f.write("\n")


def summary_lines(step: dict, out: str) -> list[str]:
  lines = list(_methods()[step["method"]].describe(step))
  if "calibration" in step:
    lines.append(f"calibration: {step['calibration']['tokens']} tokens of "
                 f"{step['calibration']['data']}")
  lines.append(f"wrote {out} ({REPORT}); evaluate with tools/evaluate.py --run {out}, "
               f"fine-tune with python -m experiments --workdir {out}")
  return lines


def main(argv: list[str] | None = None) -> int:
  from moejax.compress.calibrate import DEFAULT_MAX_TOKENS  # noqa: PLC0415

  methods = _methods()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="run directory (config.json + checkpoints/)")
  p.add_argument("--method", required=True,
                 help="; ".join(f"{m.name}: {m.summary}" for m in methods.values()))
  p.add_argument("--seed", type=int, default=0, help="random choices; sampled inputs")
  p.add_argument("--calib", default="train",
                 help="'train', 'val', or a .txt/.jsonl file or directory (default: train, "
                      "so that scores on the validation split are not on calibration rows)")
  p.add_argument("--calib-batches", type=int, default=None,
                 help="calibration batches of train.batch_size rows (default "
                      "train.eval_batches)")
  p.add_argument("--calib-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                 help="layer inputs kept per layer (tokens)")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: newest)")
  p.add_argument("--out", required=True, help="new run directory")
  seen: dict[str, str] = {}
  for m in methods.values():
    group = p.add_argument_group(f"--method {m.name}")
    for o in m.options:
      if o.flag in seen:
        raise ValueError(f"{o.flag} is declared by --method {seen[o.flag]} and {m.name}")
      seen[o.flag] = m.name
      kwargs = {k: v for k, v in o.kwargs.items() if k != "required"}
      kwargs["help"] = kwargs.get("help", "") + (" (required)" if o.kwargs.get("required")
                                                  else "")
      group.add_argument(o.flag, default=None, **{k: v for k, v in kwargs.items()
                                                  if k != "default"})
  args = p.parse_args(argv)
  for m in methods.values():  # method defaults apply only to the chosen method
    for o in m.options:
      if m.name == args.method and getattr(args, o.dest) is None and "default" in o.kwargs:
        setattr(args, o.dest, o.kwargs["default"])
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
