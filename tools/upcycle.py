"""Sparse upcycling of a dense run into a new MoE run directory.

  python tools/upcycle.py --from DENSE_RUN_DIR --config configs/upcycle.py[:variant] \
      --out DIR [--config.key=value ...] [--overwrite]

Builds the MoE of the config with init.from_dense=DENSE_RUN_DIR (experts from
the dense FFNs, fresh router, everything else carried over; with
init.upcycle_attention also attention experts copied from the dense attention,
e.g. the `copy_attn` variant; moejax/init),
evaluates the dense and the upcycled model on the same validation batches
(train.eval_batches of them), and writes DIR: config.json, a step-0
checkpoint (parameters, fresh optimizer state, data iterator at the start)
and upcycle_check.json {"dense_val_loss", "upcycled_val_loss", ...}.
`python -m experiments --workdir DIR` then trains it.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def upcycle_run(cfg, dense_dir: str, out: str, overwrite: bool = False) -> dict:
  """Writes the upcycled run directory `out`; returns the upcycle_check.json dict."""
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from moejax.train import trainer  # noqa: PLC0415
  from moejax.train.checkpoint import Checkpointer  # noqa: PLC0415
  from moejax.train.optimizer import make_optimizer  # noqa: PLC0415

  cfg.init.from_dense = os.path.abspath(dense_dir)
  data = trainer.prepare(cfg)
  if os.path.exists(os.path.join(out, "config.json")) and not overwrite:
    raise ValueError(f"--out {out} already holds a run; use a fresh directory or --overwrite")
  trainer.check_workdir(cfg, out, overwrite=True)
  os.makedirs(out, exist_ok=True)
  state = trainer.init_state(cfg, make_optimizer(cfg.train))
  val = data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
  val_bytes = sum(data.text_bytes(b["targets"]) for b in val)
  dense_cfg = run_config(dense_dir)
  dense_params, dense_collections, dense_step = load_run(dense_dir, cfg.init.step)
  dense = trainer.evaluate(trainer.make_eval_step(dense_cfg),
                           {"params": dense_params, "collections": dense_collections}, val,
                           val_bytes)
  moe = trainer.evaluate(trainer.make_eval_step(cfg), state, val, val_bytes)
  trainer.write_config(cfg, out)
  ckpt = Checkpointer(out, cfg.train.keep_checkpoints)
  ckpt.save(0, state, data.train_iterator(cfg.train.batch_size, cfg.seed).get_state())
  ckpt.close()
  check = {"dense_run": os.path.abspath(dense_dir), "dense_step": int(dense_step),
           "upcycle": cfg.init.upcycle, "noise": cfg.init.noise,
           "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
           "upcycle_attention": bool(cfg.init.upcycle_attention),
           "attn_experts": cfg.model.attn_experts, "attn_top_k": cfg.model.attn_top_k,
           "attn_shared_kv": bool(cfg.model.attn_shared_kv),
           "eval_batches": cfg.train.eval_batches,
           "dense_val_loss": dense["val/loss"], "upcycled_val_loss": moe["val/loss"]}
  with open(os.path.join(out, "upcycle_check.json"), "w") as f:
    json.dump(check, f, indent=2)
  return check


def main() -> None:
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file("config", None, "MoE config file[:args].", lock_config=True)
  flags.DEFINE_string("from", None, "Dense run directory to upcycle.")
  flags.DEFINE_string("out", None, "New run directory.")
  flags.DEFINE_bool("overwrite", False, "Replace a run in --out.")
  flags.mark_flags_as_required(["config", "from", "out"])

  def run(_):
    from absl import logging  # noqa: PLC0415
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    try:
      check = upcycle_run(f.config, f["from"].value, f.out, f.overwrite)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(check, indent=2))
    print(f"continue training with: python -m experiments --workdir {f.out}")

  app.run(run)


if __name__ == "__main__":
  main()
