"""Expert-parallel dispatch: offset arithmetic by hand, exchanges and layers on 8 devices.

The 8-device checks run in one subprocess (`ep_worker.py`): XLA_FLAGS must be
set before JAX initialises, and one process keeps the compilations few.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax.moe.dispatch import expert_parallel as epd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _np(t):
  return [np.asarray(a).tolist() for a in t]


def test_ragged_offsets_by_hand():
  # sizes[i, j]: rows device i sends to device j.
  sizes = np.array([[1, 2, 0],
                    [3, 0, 1],
                    [0, 4, 2]])
  # Device 1 sends [3, 0, 1] starting at [0, 3, 3]; on device 0 its rows land
  # after device 0's own 1 row, on device 1 after device 0's 2 rows, on
  # device 2 after device 0's 0 rows; it receives 2, 0, 4 rows from 0, 1, 2.
  assert _np(epd.ragged_offsets(sizes, 1)) == [[0, 3, 3], [3, 0, 1], [1, 2, 0], [2, 0, 4]]
  assert _np(epd.ragged_offsets(sizes, 0)) == [[0, 1, 3], [1, 2, 0], [0, 0, 0], [1, 3, 0]]
  assert _np(epd.ragged_offsets(sizes, 2)) == [[0, 0, 4], [0, 4, 2], [4, 2, 1], [0, 1, 2]]
  # The reverse exchange sends back what device 1 received ([2, 0, 4] rows),
  # to the senders' input offsets of their chunks for device 1 ([1, 3, 0]).
  assert _np(epd.ragged_offsets(sizes.T, 1)) == [[0, 2, 2], [2, 0, 4], [1, 3, 0], [3, 0, 1]]


def test_received_experts_by_hand():
  # 2 sources x 2 local experts: source 0 sent 1 row for e0, 2 for e1;
  # source 1 sent 0 for e0, 1 for e1; 2 buffer rows are padding.
  counts = np.array([[1, 2], [0, 1]])
  assert np.asarray(epd.received_experts(counts, 6)).tolist() == [0, 1, 1, 1, 2, 2]


def _simulate(sizes: np.ndarray, rows: int):
  """Apply the documented ragged_all_to_all semantics with every device's offsets."""
  n = sizes.shape[0]
  data = [np.arange(rows) + 100 * i for i in range(n)]  # row r of device i: 100 i + r
  out = [np.full(n * rows, -1) for _ in range(n)]
  offs = [[np.asarray(a) for a in epd.ragged_offsets(sizes, i)] for i in range(n)]
  for i in range(n):
    inp, send, outp, _ = offs[i]
    for j in range(n):
      out[j][outp[j]:outp[j] + send[j]] = data[i][inp[j]:inp[j] + send[j]]
  return data, out, offs


@settings(derandomize=True, deadline=None, max_examples=60)
@given(st.integers(1, 5).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n),
                       min_size=n, max_size=n)))
def test_ragged_offsets_property(rows_list):
  """Receivers get each source's chunk, sources in order, no gaps; reverse restores."""
  sizes = np.array(rows_list, np.int64)
  n = sizes.shape[0]
  rows = int(sizes.sum(1).max(initial=0)) or 1
  data, out, offs = _simulate(sizes, rows)
  for j in range(n):
    want = np.concatenate([data[i][sizes[i, :j].sum():sizes[i, :j + 1].sum()]
                           for i in range(n)])
    assert out[j][:want.size].tolist() == want.tolist()
    assert np.all(out[j][want.size:] == -1)
    assert offs[j][3].tolist() == sizes[:, j].tolist()  # recv sizes
  # The reverse exchange's output offsets are the forward input offsets.
  for i in range(n):
    assert (np.asarray(epd.ragged_offsets(sizes.T, i)[2]).tolist()
            == [int(offs[j][0][i]) for j in range(n)])


@pytest.mark.parametrize("platform,kind,chips,ragged", [
    ("cpu", "cpu", 8, False),
    ("gpu", "NVIDIA H100 80GB HBM3", 8, True),
    ("tpu", "TPU v5 lite", 16, True),
    ("tpu", "TPU v5 lite", 32, False),  # the TPU compiler refuses it (tests/aot)
    ("tpu", "TPU v6 lite", 256, True),
])
def test_default_ragged_follows_the_platform_and_the_slice(platform, kind, chips, ragged):
  devices = [types.SimpleNamespace(platform=platform, device_kind=kind)] * chips
  assert epd.default_ragged(devices) is ragged


def test_expert_parallel_on_8_devices():
  """Exchange, capacity drops and every token-choice router on three meshes."""
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "tests.moe.dispatch.ep_worker"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["checked"] > 300
  assert not result["failures"], "\n".join(result["failures"][:20])
