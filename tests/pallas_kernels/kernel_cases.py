"""What the kernel test files share: backends, tilings, tolerances, strategies."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

ACCELERATOR_BACKENDS = {"mosaic_tpu": "tpu", "triton": "gpu"}
INTERPRET = ("interpret", "interpret_triton")
# Small tiles for the Pallas kernels: several row tiles, straddled groups,
# partial tiles in m, k and n at the tests' shapes.
TILING = {"interpret": (8, 16, 16), "interpret_triton": (16, 16, 16),
          "mosaic_tpu": (16, 128, 128), "triton": (16, 16, 16),
          "cpu": (4, 16, 16), "xla": None}
SETTINGS = settings(max_examples=20, derandomize=True, deadline=None, database=None)


def skip_unless_available(backend: str):
  """A skipif mark for accelerator backends on other platforms."""
  platform = ACCELERATOR_BACKENDS.get(backend)
  return pytest.mark.skipif(
      platform is not None and jax.default_backend() != platform,
      reason=f"backend {backend!r} needs a {platform} device; this machine runs "
      f"on {jax.default_backend()}")


def as_f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def close(actual, expected, tol: float) -> None:
  """allclose with rtol = tol and atol = tol * max(1, max |expected|)."""
  expected = np.asarray(expected, np.float64)
  atol = tol * max(1.0, float(np.abs(expected).max(initial=0.0)))
  np.testing.assert_allclose(as_f64(actual), expected, rtol=tol, atol=atol)


@st.composite
def group_sizes(draw, num_groups: int, m: int):
  """Random sizes with empty groups, sum <= m (often == m or well below)."""
  cuts = sorted(draw(st.lists(st.integers(0, m), min_size=num_groups,
                              max_size=num_groups)))
  sizes = np.diff([0] + cuts).astype(np.int32)
  zero_mask = draw(st.lists(st.booleans(), min_size=num_groups, max_size=num_groups))
  return np.where(zero_mask, 0, sizes).astype(np.int32)
