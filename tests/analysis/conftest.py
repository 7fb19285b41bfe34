"""A tiny trained run shared by the capture, trainer-metric and report tests."""

from __future__ import annotations

import pytest

from moejax.train import trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
  """A 4-step tiny run (topk, E=4, k=2) with evals and checkpoints at steps 2 and 4."""
  cfg = tiny_config()
  cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 4, 2, 2
  cfg.train.batch_size, cfg.train.eval_batches, cfg.train.log_every = 4, 1, 2
  cfg.train.warmup_steps = 2
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train(cfg, workdir)
  return workdir
