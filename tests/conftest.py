"""Shared test fixtures: tiny configs that compile and run in seconds on CPU."""

from __future__ import annotations

import os

import ml_collections
import pytest

from moejax.config import default_config


def tiny_config(**moe_overrides) -> ml_collections.ConfigDict:
  """A 2-layer, d=32 MoE LM (E=4, k=2) on 16-token sequences."""
  c = default_config()
  c.name = "tiny"
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.ffn_hidden = 64
  c.moe.num_experts = 4
  c.moe.top_k = 2
  c.moe.expert_hidden = 32
  for k, v in moe_overrides.items():
    c.moe[k] = v
  c.train.steps = 30
  c.train.batch_size = 8
  c.train.seq_len = 16
  c.train.warmup_steps = 5
  c.train.lr = 1e-2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  return c


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m experiments` overrides for a tiny quickstart-shaped run.
TINY_FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=2",
              "--config.model.num_heads=2", "--config.moe.num_experts=4",
              "--config.moe.expert_hidden=32", "--config.train.batch_size=4",
              "--config.train.seq_len=16", "--config.train.warmup_steps=2",
              "--config.train.eval_batches=1"]


@pytest.fixture
def tiny() -> ml_collections.ConfigDict:
  return tiny_config()
