"""Shared by the AOT tests: the libtpu skip mark, no persistent cache, a small expert-parallel config."""

from __future__ import annotations

import pytest

from moejax.aot.topology import libtpu_available, uncached_compiles
from tests.conftest import tiny_config

needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu (the TPU compiler) is not installed: "
    "pip install -e '.[tpu]' (part of the dev extra on Linux x86-64)")


@pytest.fixture(autouse=True)
def _no_persistent_cache():
  """Compile-only TPU executables cannot be read back from the tests' compilation cache."""
  with uncached_compiles():
    yield


def ep_config(expert: int = 4, **train):
  """A 2-layer MoE (E=8, D=F=128) for a 4-chip slice, expert-parallel over `expert` chips."""
  c = tiny_config()
  c.model.d_model = 128
  c.moe.num_experts = 8
  c.moe.expert_hidden = 128
  c.train.batch_size = 8
  c.parallel.expert = expert
  for k, v in train.items():
    c.train[k] = v
  return c
