"""Distillation recovery: fine-tune a compressed run against the uncompressed teacher run.

    --method distill --teacher TEACHER_RUN --steps N [--temperature T] [--alpha A]
        [--lr LR] [--warmup-steps W]

OUT_DIR starts as the compressed run (--run, unchanged variables) with the
config of a distillation run: train.distill.teacher = TEACHER_RUN (absolute),
train.distill.step = its newest checkpoint (fixed, so a resumed run reads
the same teacher), train.distill.temperature = T, train.distill.alpha = A,
train.steps = N, train.lr = LR, train.warmup_steps = W. The tool then trains
it there with the trainer (moejax/train/trainer.py; the loss is
moejax/train/distill.py's):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

alpha = 1 is pure distillation, alpha = 0 plain fine-tuning on the LM loss.
Defaults: T = 1 and alpha = 1 (match the teacher's distributions, which the
compression changed); LR = the run's train.lr / 10 (a trained model and a
fresh AdamW state); W = N // 10 warmup steps; cosine decay to
train.min_lr_ratio as usual. Being an ordinary run, an interrupted
distillation resumes with `python -m experiments --workdir OUT_DIR`.

The compress.json entry: teacher (absolute path), teacher_step, temperature,
alpha, steps, lr, warmup_steps; once trained, on the run's validation batches
(the trainer's eval): val_loss / val_bpb before and after, the teacher's,
and val_kd_loss before and after (the T^2 * KL term). An interrupted run
records finished = false and trained_steps instead of the "after" values.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from moejax.checks import ConfigError, is_int
from moejax.compress.calibrate import Calibration
from moejax.compress.method import Method, Option, Result
from moejax.train import distill as distill_lib

LR_FACTOR = 0.1  # default --lr: this fraction of the compressed run's train.lr
WARMUP_DIVISOR = 10  # default --warmup-steps: --steps // this
FLAGS = {"temperature": "--temperature", "alpha": "--alpha"}


def checkpoint_steps(run_dir: str) -> list[int]:
  """The finished checkpoint steps of a run (orbax renames a step's directory to its number
  once it is complete)."""
  path = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path)
                if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def _invalid(flag: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"{flag}={value!r} is invalid: {allowed}")


def fine_tune_schedule(cfg: ml_collections.ConfigDict, args) -> tuple[float, int]:
  """(learning rate, warmup steps): the options, or the defaults for fine-tuning."""
  lr = cfg.train.lr * LR_FACTOR if args.lr is None else args.lr
  warmup = args.steps // WARMUP_DIVISOR if args.warmup_steps is None else args.warmup_steps
  return lr, warmup


def _cli_check(cfg: ml_collections.ConfigDict, args) -> None:
  distill_lib.check_teacher(cfg, args.teacher, "--teacher")
  if not checkpoint_steps(args.teacher):
    _invalid("--teacher", args.teacher, "that run has no finished checkpoint")
  if not is_int(args.steps) or args.steps < 1:
    _invalid("--steps", args.steps, "must be an integer >= 1")
  distill_lib.check_values(args.temperature, args.alpha, FLAGS)
  if args.lr is not None and (isinstance(args.lr, bool) or not math.isfinite(args.lr)
                              or args.lr <= 0):
    _invalid("--lr", args.lr, "must be a finite number > 0")
  if args.warmup_steps is not None and (not is_int(args.warmup_steps)
                                        or not 0 <= args.warmup_steps <= args.steps):
    _invalid("--warmup-steps", args.warmup_steps, f"must be an integer in [0, --steps="
                                                  f"{args.steps}]")


def distill_config(cfg: ml_collections.ConfigDict, args) -> ml_collections.ConfigDict:
  """The compressed run's config as a distillation run of --steps steps (validated)."""
  from moejax.validation import validate  # noqa: PLC0415

  out = ml_collections.ConfigDict(cfg.to_dict())
  lr, warmup = fine_tune_schedule(cfg, args)
  out.train.steps = int(args.steps)
  out.train.lr = float(lr)
  out.train.warmup_steps = int(warmup)
  d = out.train.distill
  d.teacher = os.path.abspath(args.teacher)
  d.step = checkpoint_steps(args.teacher)[-1]
  d.temperature = float(args.temperature)
  d.alpha = float(args.alpha)
  validate(out)  # before OUT_DIR is written
  return out


def _cli_apply(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration | None,
               args, previous: list[dict]) -> Result:
  del calib, previous
  new = distill_config(cfg, args)
  d = new.train.distill
  entry = {"teacher": d.teacher, "teacher_step": int(d.step), "temperature": d.temperature,
           "alpha": d.alpha, "steps": new.train.steps, "lr": new.train.lr,
           "warmup_steps": new.train.warmup_steps}
  return Result(new, variables, entry)


def kd_evaluator(cfg: ml_collections.ConfigDict, teacher_cfg: ml_collections.ConfigDict
                 ) -> Callable[[dict, dict, list[dict]], float]:
  """`measure(student_variables, teacher_variables, batches)`: the distillation term
  (T^2 * KL at train.distill.temperature) of the student to the teacher, mean over the
  tokens of equal-sized `batches`, both models in evaluation mode (one compilation)."""
  from moejax import model as lm  # noqa: PLC0415

  student = lm.make_model(cfg, deterministic=True)
  teacher_logits = distill_lib.logits_fn(teacher_cfg)
  t = cfg.train.distill.temperature

  @jax.jit
  def one(s_vars, t_vars, inputs_BxL):
    s_BxLxV, _ = student.apply(s_vars, inputs_BxL)
    return distill_lib.kd_loss(s_BxLxV, teacher_logits(t_vars, inputs_BxL), t)

  def measure(s_vars: dict, t_vars: dict, batches: list[dict]) -> float:
    return float(np.mean([float(one(s_vars, t_vars, b["inputs"])) for b in batches]))

  return measure


def _after_write(out: str, args) -> dict:
  """Trains OUT_DIR (the distillation run) and measures it before and after (the teacher
  is read again afterwards rather than held beside the trainer's copy)."""
  del args
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from moejax.train import trainer  # noqa: PLC0415

  cfg = run_config(out)
  data = trainer.prepare(cfg)
  val = data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
  val_bytes = sum(data.text_bytes(b["targets"]) for b in val)
  teacher = distill_lib.load_teacher(cfg)
  kd = kd_evaluator(cfg, teacher.cfg)

  def measure(c, variables) -> dict[str, float]:
    state = {"params": variables["params"],
             "collections": {k: v for k, v in variables.items() if k != "params"}}
    return trainer.evaluate(trainer.make_eval_step(c), state, val, val_bytes)

  params, collections, _ = load_run(out)
  student = {"params": params, **collections}
  before = measure(cfg, student)
  teacher_eval = measure(teacher.cfg, teacher.variables)
  report = {"teacher_val_loss": teacher_eval["val/loss"],
            "teacher_val_bpb": teacher_eval["val/bpb"],
            "val_loss_before": before["val/loss"], "val_bpb_before": before["val/bpb"],
            "val_kd_loss_before": kd(student, teacher.variables, val)}
  del teacher, student
  summary = trainer.train(cfg, out, data)
  if summary.get("preempted"):
    return {**report, "finished": False, "trained_steps": int(summary["steps"])}
  params, collections, _ = load_run(out)
  teacher = distill_lib.load_teacher(cfg)
  report.update(finished=True, trained_steps=int(summary["steps"]),
                val_loss_after=summary["final_val_loss"], val_bpb_after=summary["final_val_bpb"],
                val_kd_loss_after=kd({"params": params, **collections}, teacher.variables,
                                      val))
  return report


def _cli_describe(entry: dict) -> list[str]:
  lines = [f"distillation from {entry['teacher']} (step {entry['teacher_step']}): "
           f"{entry['steps']} steps, T={entry['temperature']}, alpha={entry['alpha']}, "
           f"lr={entry['lr']:g}, warmup {entry['warmup_steps']} steps"]
  if entry.get("finished"):
    lines.append(f"  val bpb {entry['val_bpb_before']:.4f} -> {entry['val_bpb_after']:.4f} "
                 f"(teacher {entry['teacher_val_bpb']:.4f}); val KD loss "
                 f"{entry['val_kd_loss_before']:.4f} -> {entry['val_kd_loss_after']:.4f}")
  elif "trained_steps" in entry:
    lines.append(f"  interrupted after step {entry['trained_steps']}: resume it with "
                 "python -m experiments --workdir on the output directory")
  return lines


METHOD = Method(
    name="distill",
    summary="fine-tune the compressed run against an uncompressed teacher run "
            "(moejax/compress/distill.py)",
    options=(
        Option("--teacher", {"required": True, "help": "the teacher's run directory (same "
                                                        "vocabulary)"}),
        Option("--steps", {"required": True, "type": int, "help": "distillation steps"}),
        Option("--temperature", {"type": float, "default": 1.0,
                                 "help": "softmax temperature T > 0 of both models (default 1)"}),
        Option("--alpha", {"type": float, "default": 1.0,
                           "help": "weight of the T^2 * KL term, in [0, 1]; 1 - alpha weighs "
                                   "the LM cross-entropy (default 1: pure distillation)"}),
        Option("--lr", {"type": float, "help": "peak learning rate (default: the run's "
                                               "train.lr / 10)"}),
        Option("--warmup-steps", {"type": int, "help": "linear warmup steps (default: "
                                                       "--steps // 10)"})),
    check=_cli_check, apply=_cli_apply, calibrates=lambda args: False,
    describe=_cli_describe, after_write=_after_write)
