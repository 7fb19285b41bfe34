"""train.* keys: the loop's (steps, logging, eval, checkpoints), the optimizer's and
train.distill.* (moejax/train/distill.py; it reads the teacher run's config.json)."""

from __future__ import annotations

import ml_collections

from moejax.checks import fail, is_int, positive
from moejax.train import distill


def check_config(cfg: ml_collections.ConfigDict) -> None:
  t = cfg.train
  for key in ("train.steps", "train.batch_size", "train.seq_len", "train.lr",
              "train.log_every", "train.eval_every", "train.eval_batches",
              "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps"):
    positive(cfg, key)
  for key in ("train.warmup_steps", "train.weight_decay", "train.grad_clip",
              "train.min_lr_ratio"):
    positive(cfg, key, allow_zero=True)
  if not 0 <= t.min_lr_ratio <= 1:
    fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
  if not is_int(t.grad_accum_steps) or t.grad_accum_steps < 1:
    fail("train.grad_accum_steps", t.grad_accum_steps, "must be a positive integer")
  if t.batch_size % t.grad_accum_steps:
    fail("train.grad_accum_steps", t.grad_accum_steps,
         f"must divide train.batch_size={t.batch_size}")
  if t.warmup_steps > t.steps:
    fail("train.warmup_steps", t.warmup_steps, f"must be <= train.steps={t.steps}")
  distill.check_config(cfg)
