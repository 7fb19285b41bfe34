"""Data shards per process and the single-device no-op placement."""

from __future__ import annotations

import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.parallel import runtime
from moejax.train import data as data_lib
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def data():
  return data_lib.make_data("", 16, 0.02, 0)


def test_shard_batches_concatenate_shards_in_order_and_resume(data):
  it = data_lib.ShardBatches(data, 2, 7, [0, 1], 2)
  parts = [data.train_iterator(2, 7, j, 2) for j in (0, 1)]
  for _ in range(3):
    got = next(it)
    want = [next(p) for p in parts]
    for k in ("inputs", "targets"):
      np.testing.assert_array_equal(got[k], np.concatenate([w[k] for w in want]))
  state = it.get_state()
  assert state == parts[0].get_state()  # one grain state, as a single iterator's
  again = data_lib.ShardBatches(data, 2, 7, [0, 1], 2)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"], next(it)["inputs"])


def test_data_shards_and_single_device_placement(data):
  cfg = tiny_config()
  assert runtime.data_shards(cfg) == (1, [0])
  cfg.data.shards = 2
  assert runtime.data_shards(cfg) == (2, [0, 1])
  place = runtime.Placement(cfg, "unused")
  assert place.layout is None  # one device: the trainer's path is unchanged
  batch = {"inputs": np.zeros((8, 16), np.int32)}
  assert place.batch(batch) is batch
  assert isinstance(place.train_iterator(data, 8, 0), data_lib.ShardBatches)
  cfg.data.shards = 0
  assert not isinstance(place.train_iterator(data, 8, 0), data_lib.ShardBatches)


def test_data_shards_must_split_over_processes(monkeypatch):
  cfg = tiny_config()
  cfg.data.shards = 3
  monkeypatch.setattr(runtime.jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match="data.shards=3 is invalid"):
    runtime.data_shards(cfg)
