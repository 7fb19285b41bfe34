"""Pallas TPU (Mosaic) grouped matmul kernels; also the `interpret` backend.

Group metadata is scalar-prefetched into SMEM (`PrefetchScalarGridSpec`):
the grid walks a schedule of (group, row tile) visits built by
`_common.tile_visits`, so a row tile that straddles a group boundary is
visited once per group and written under a row mask. The grid's visit axis
has a data-dependent length (the number of live visits), so the cost follows
the live rows, not m. Rows of unvisited tiles are zeroed by a final `where`.

gmm grid: (n tiles, visits, k tiles), float32 accumulator in VMEM; the row
mask is applied when the last k tile is stored; the first visit of a tile
starts from zeros, later visits (other groups) keep the rows already written.
tgmm grid: (n tiles, k tiles, visits); the accumulator is reset when the
group changes and written to out[group] at the group's last visit; empty
groups get one visit that writes zeros.

`interpret=True` runs exactly these kernels with Pallas' interpreter on any
platform (this is the `interpret` backend used by the tests on CPU).
Shapes are zero-padded to tile multiples. Tiling (tm, tk, tn): tm a multiple
of 16 and tk, tn multiples of 128 on real TPUs (any sizes in interpret mode).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common


def default_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """Per-shape default: big tiles for big shapes, no waste on small ones."""
  return (_common.pick_tile(m, 256 if m >= 4096 else 128, 16),
          _common.pick_tile(k, 512, 128), _common.pick_tile(n, 1024, 128))


def _check_tpu_tiling(tiling: tuple[int, int, int], interpret: bool) -> None:
  tm, tk, tn = tiling
  if not interpret and (tm % 16 or tk % 128 or tn % 128):
    raise ValueError(f"tiling={tiling} is not valid on TPU; allowed: tm a "
                     "multiple of 16, tk and tn multiples of 128")


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array, *, out_dtype, transpose_rhs: bool, tiling,
        interpret: bool = False) -> jax.Array:
  m, k = lhs_MxK.shape
  num_local = rhs_GxKxN.shape[0]
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  tm, tk, tn = tiling or default_tiling(m, k, n)
  _check_tpu_tiling((tm, tk, tn), interpret)
  cdt = _common.compute_dtype(lhs_MxK.dtype, rhs_GxKxN.dtype)
  m_pad, k_pad, n_pad = (_common.round_up(m, tm), _common.round_up(k, tk),
                         _common.round_up(n, tn))
  lhs = _common.pad_axis(_common.pad_axis(lhs_MxK.astype(cdt), 0, m_pad), 1,
                         k_pad)
  k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
  rhs = _common.pad_axis(_common.pad_axis(rhs_GxKxN.astype(cdt), k_axis, k_pad),
                         n_axis, n_pad)
  m_tiles, k_tiles, n_tiles = m_pad // tm, k_pad // tk, n_pad // tn

  starts, ends = _common.local_bounds(group_sizes, group_offset, num_local)
  group_ids, tile_ids, num_visits = _common.tile_visits(
      starts, ends, tm, m_tiles, visit_empty=False)
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

  def kernel(starts_ref, ends_ref, gid_ref, tid_ref, lhs_ref, rhs_ref, out_ref,
             acc_ref):
    v, k_i = pl.program_id(1), pl.program_id(2)

    @pl.when(k_i == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...],
                                    (contract, ((), ())),
                                    preferred_element_type=jnp.float32)

    @pl.when(k_i == k_tiles - 1)
    def _():
      g = gid_ref[v]
      rows = tid_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
      first_visit = (v == 0) | (tid_ref[jnp.maximum(v - 1, 0)] != tid_ref[v])
      prev = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
      out_ref[...] = jnp.where(mask, acc_ref[...], prev).astype(out_ref.dtype)

  def lhs_map(n_i, v, k_i, starts_ref, ends_ref, gid_ref, tid_ref):
    return tid_ref[v], k_i

  def rhs_map(n_i, v, k_i, starts_ref, ends_ref, gid_ref, tid_ref):
    if transpose_rhs:
      return gid_ref[v], n_i, k_i
    return gid_ref[v], k_i, n_i

  def out_map(n_i, v, k_i, starts_ref, ends_ref, gid_ref, tid_ref):
    return tid_ref[v], n_i

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n_tiles, num_visits, k_tiles),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map),
                    pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(lhs.size * lhs.dtype.itemsize * n_tiles
                          + rhs.size * rhs.dtype.itemsize
                          + m * n * jnp.dtype(out_dtype).itemsize)),
      interpret=interpret,
  )(starts, ends, group_ids, tile_ids, lhs, rhs)
  keep = _common.block_row_mask(starts, ends, m)
  return jnp.where(keep[:, None], out[:m, :n], 0).astype(out_dtype)


def tgmm(x_MxK: jax.Array, dy_MxN: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array, *, num_actual_groups: int, out_dtype, tiling,
         interpret: bool = False) -> jax.Array:
  m, k = x_MxK.shape
  n = dy_MxN.shape[1]
  tm, tk, tn = tiling or default_tiling(m, k, n)
  _check_tpu_tiling((tm, tk, tn), interpret)
  cdt = _common.compute_dtype(x_MxK.dtype, dy_MxN.dtype)
  m_pad, k_pad, n_pad = (_common.round_up(m, tm), _common.round_up(k, tk),
                         _common.round_up(n, tn))
  x = _common.pad_axis(_common.pad_axis(x_MxK.astype(cdt), 0, m_pad), 1, k_pad)
  dy = _common.pad_axis(_common.pad_axis(dy_MxN.astype(cdt), 0, m_pad), 1,
                        n_pad)
  m_tiles, k_tiles, n_tiles = m_pad // tm, k_pad // tk, n_pad // tn

  starts, ends = _common.local_bounds(group_sizes, group_offset,
                                      num_actual_groups)
  group_ids, tile_ids, num_visits = _common.tile_visits(
      starts, ends, tm, m_tiles, visit_empty=True)

  def kernel(starts_ref, ends_ref, gid_ref, tid_ref, x_ref, dy_ref, out_ref,
             acc_ref):
    v = pl.program_id(2)
    last_v = pl.num_programs(2) - 1
    g = gid_ref[v]

    @pl.when((v == 0) | (gid_ref[jnp.maximum(v - 1, 0)] != g))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(ends_ref[g] > starts_ref[g])
    def _():
      row0 = tid_ref[v] * tm
      rows_x = row0 + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
      rows_y = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      in_x = (rows_x >= starts_ref[g]) & (rows_x < ends_ref[g])
      in_y = (rows_y >= starts_ref[g]) & (rows_y < ends_ref[g])
      # Mask in float32 and transpose there (32-bit transposes lower
      # everywhere), then multiply in the compute dtype.
      xs = jnp.where(in_x, x_ref[...].astype(jnp.float32), 0.0)
      ys = jnp.where(in_y, dy_ref[...].astype(jnp.float32), 0.0)
      acc_ref[...] += lax.dot(xs.T.astype(cdt), ys.astype(cdt),
                              preferred_element_type=jnp.float32)

    next_g = gid_ref[jnp.minimum(v + 1, last_v)]

    @pl.when((v == last_v) | (next_g != g))
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  def x_map(n_i, k_i, v, starts_ref, ends_ref, gid_ref, tid_ref):
    return tid_ref[v], k_i

  def dy_map(n_i, k_i, v, starts_ref, ends_ref, gid_ref, tid_ref):
    return tid_ref[v], n_i

  def out_map(n_i, k_i, v, starts_ref, ends_ref, gid_ref, tid_ref):
    return gid_ref[v], k_i, n_i

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_actual_groups, k_pad, n_pad),
                                     out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n_tiles, k_tiles, num_visits),
          in_specs=[pl.BlockSpec((tm, tk), x_map),
                    pl.BlockSpec((tm, tn), dy_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(x.size * x.dtype.itemsize * n_tiles
                          + dy.size * dy.dtype.itemsize * k_tiles
                          + num_actual_groups * k * n
                          * jnp.dtype(out_dtype).itemsize)),
      interpret=interpret,
  )(starts, ends, group_ids, tile_ids, x, dy)
  return out[:, :k, :n]
