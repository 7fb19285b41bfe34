"""Reference backend: `jax.lax.ragged_dot` / `ragged_dot_general`.

Correct on every platform, but on CPU it costs about G times a dense matmul,
so it is the reference, not the fast path. The group block selected by
group_offset is handled here (not by ragged_dot's own group_offset) so the
semantics are identical to the other backends: the first local group absorbs
the rows before the block, the last absorbs the rows after it, and those rows
are masked to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common


def _local_sizes(starts_G: jax.Array, ends_G: jax.Array, m: int) -> jax.Array:
  """Local sizes summing exactly to m (prefix into group 0, suffix into last)."""
  sizes = ends_G - starts_G
  sizes = sizes.at[0].add(starts_G[0])
  return sizes.at[-1].add(m - ends_G[-1])


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array, *, out_dtype, transpose_rhs: bool,
        tiling) -> jax.Array:
  del tiling
  m = lhs_MxK.shape[0]
  cdt = _common.compute_dtype(lhs_MxK.dtype, rhs_GxKxN.dtype)
  rhs = jnp.swapaxes(rhs_GxKxN, 1, 2) if transpose_rhs else rhs_GxKxN
  starts, ends = _common.local_bounds(group_sizes, group_offset, rhs.shape[0])
  out = lax.ragged_dot(lhs_MxK.astype(cdt), rhs.astype(cdt),
                       _local_sizes(starts, ends, m),
                       preferred_element_type=jnp.float32)
  keep = _common.block_row_mask(starts, ends, m)
  return jnp.where(keep[:, None], out, 0).astype(out_dtype)


def tgmm(x_MxK: jax.Array, dy_MxN: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array, *, num_actual_groups: int, out_dtype,
         tiling) -> jax.Array:
  del tiling
  m = x_MxK.shape[0]
  cdt = _common.compute_dtype(x_MxK.dtype, dy_MxN.dtype)
  starts, ends = _common.local_bounds(group_sizes, group_offset,
                                      num_actual_groups)
  keep = _common.block_row_mask(starts, ends, m)
  x = jnp.where(keep[:, None], x_MxK, 0).astype(cdt)
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out = lax.ragged_dot_general(x, dy_MxN.astype(cdt),
                               _local_sizes(starts, ends, m), dims,
                               preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
