"""Run directories for tests, written without training (config.json + a step-0 checkpoint)."""

from __future__ import annotations

import os

import jax
import ml_collections

from moejax.train import data as data_lib
from moejax.train import trainer
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import make_optimizer


def write_run(workdir: str, cfg: ml_collections.ConfigDict, perturb: float = 0.0) -> dict:
  """A run directory holding `cfg` and its initial state (params scaled by 1+perturb*noise).

  Returns the saved params.
  """
  os.makedirs(workdir, exist_ok=True)
  trainer.write_config(cfg, workdir)
  state = trainer.init_state(cfg, make_optimizer(cfg.train))
  if perturb:
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(11), len(leaves))
    leaves = [x + perturb * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state["params"] = jax.tree.unflatten(tree, leaves)
  data = data_lib.make_data(cfg.data.path, cfg.train.seq_len, cfg.data.val_fraction, cfg.seed)
  ckpt = Checkpointer(workdir, 1)
  ckpt.save(0, state, data.train_iterator(cfg.train.batch_size, cfg.seed).get_state())
  ckpt.close()
  return state["params"]


def dense_reference(cfg: ml_collections.ConfigDict, ids) -> tuple[dict, jax.Array]:
  """A dense model's params and logits on `ids`, with non-trivial norm gains.

  The perturbation keeps upcycling equalities from relying on unit gains.
  """
  from moejax import model as lm  # noqa: PLC0415
  variables = lm.init(jax.random.key(1), cfg)
  variables = jax.tree.map(lambda x: x * 1.1 + 0.01, variables)
  logits, _ = lm.apply(variables, ids, cfg)
  return variables["params"], logits
