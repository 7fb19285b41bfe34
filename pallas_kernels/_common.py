"""Group bookkeeping shared by every backend.

All backends receive group sizes that `api.py` has already normalised
(negative sizes -> 0, cumulative ends clipped to m), and describe the groups
this call owns by their row bounds: `starts_G[j], ends_G[j]` are the first and
one-past-last row of local group j (= global group group_offset + j). Groups
past the end of `group_sizes` are empty and sit at the live end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize_group_sizes(group_sizes_G: jax.Array, m: int) -> jax.Array:
  """Sizes whose cumulative sum never passes m: negatives -> 0, then clip.

  This is what makes traced (unchecked) group sizes well defined: groups are
  cut at row m, so rows beyond m are ignored and later groups become empty.
  """
  sizes = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return (ends - starts).astype(jnp.int32)


def local_bounds(group_sizes_G: jax.Array, group_offset: jax.Array,
                 num_local: int) -> tuple[jax.Array, jax.Array]:
  """Row bounds [start, end) of groups group_offset .. group_offset+num_local-1.

  `group_sizes_G` must be normalised. Groups with a global index outside
  [0, len(group_sizes)) are empty and placed at the nearest live boundary.
  """
  num_total = group_sizes_G.shape[0]
  bounds = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes_G).astype(jnp.int32)])
  idx = group_offset.astype(jnp.int32) + jnp.arange(num_local, dtype=jnp.int32)
  starts = bounds[jnp.clip(idx, 0, num_total)]
  ends = bounds[jnp.clip(idx + 1, 0, num_total)]
  ends = jnp.maximum(ends, starts)
  return starts, ends


def block_row_mask(starts_G: jax.Array, ends_G: jax.Array, m: int) -> jax.Array:
  """[m] bool: rows that belong to one of the local groups."""
  rows = jnp.arange(m, dtype=jnp.int32)
  return (rows >= starts_G[0]) & (rows < ends_G[-1])


def compute_dtype(*dtypes) -> jnp.dtype:
  """Operand dtype for the products: bfloat16 if any input is, else float32."""
  if any(jnp.dtype(d) == jnp.bfloat16 for d in dtypes):
    return jnp.dtype(jnp.bfloat16)
  return jnp.dtype(jnp.float32)


def round_up(x: int, mult: int) -> int:
  return -(-x // mult) * mult


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pad `axis` of x up to `size` (no-op when already that size)."""
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def tile_visits(starts_G: jax.Array, ends_G: jax.Array, tm: int, m_tiles: int,
                *, visit_empty: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Row-tile schedule for the Pallas kernels.

  Every group visits each tm-row tile its rows touch, in row order, so a tile
  straddling a boundary is visited once per group (the kernels mask its
  rows). With visit_empty, empty groups get one (masked, no-op) visit so the
  tgmm kernel still writes their zero output. Returns (group_ids_V,
  tile_ids_V, num_visits) with V = m_tiles + G - 1, an upper bound; entries
  past num_visits repeat valid indices and must not be computed.
  """
  num_local = starts_G.shape[0]
  nonempty = ends_G > starts_G
  first_tile = starts_G // tm
  counts = jnp.where(nonempty, (ends_G + tm - 1) // tm - first_tile, 0)
  if visit_empty:
    counts = jnp.maximum(counts, 1)
  max_visits = m_tiles + num_local - 1
  group_ids = jnp.repeat(jnp.arange(num_local, dtype=jnp.int32), counts,
                         total_repeat_length=max_visits)
  group_ids = jnp.clip(group_ids, 0, num_local - 1)
  first_visit = jnp.cumsum(counts) - counts
  v = jnp.arange(max_visits, dtype=jnp.int32)
  tile_ids = first_tile[group_ids] + v - first_visit[group_ids]
  tile_ids = jnp.clip(tile_ids, 0, m_tiles - 1).astype(jnp.int32)
  return group_ids, tile_ids, jnp.sum(counts).astype(jnp.int32)


def pick_tile(dim: int, preferred: int, align: int) -> int:
  """Largest tile <= preferred that is a multiple of align, or the padded dim."""
  return min(preferred, round_up(dim, align))
