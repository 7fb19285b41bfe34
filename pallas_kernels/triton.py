"""Pallas GPU grouped matmul kernels (Triton lowering).

Same visit schedule as the TPU kernel (`_common.tile_visits`), but GPUs have
no scalar prefetch, so the schedule arrays are ordinary kernel inputs read as
scalars, and tiles are loaded with explicit row masks from full-array refs.

gmm: grid (max visits, n tiles); program (v, j) computes the [tm, tn] tile of
row tile tile_ids[v] for group group_ids[v] with a loop over k tiles, and
stores only that group's rows (masked store), so the programs of a
straddling tile write disjoint rows. Programs with v >= num_visits return at
once: the cost follows the live rows.
tgmm: grid (groups, k tiles, n tiles); each program owns out[g, k-tile,
n-tile] and loops over the row tiles of its group only (a data-dependent
trip count), with rows of other groups masked to zero on load.

Block sizes must be powers of two >= 16 (Triton's dot); shapes are
zero-padded to tile multiples. These kernels also run with interpret=True
(tests exercise them that way on CPU); they have not been run on a GPU here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common


def _pow2_tile(dim: int, preferred: int) -> int:
  return min(preferred, max(16, pl.next_power_of_2(dim)))


def default_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  return _pow2_tile(m, 64), _pow2_tile(k, 64), _pow2_tile(n, 128)


def _check_tiling(tiling: tuple[int, int, int]) -> None:
  if any(t < 16 or t & (t - 1) for t in tiling):
    raise ValueError(f"tiling={tiling} is not valid for the triton backend; "
                     "allowed: powers of two >= 16")


def _precision(dtype) -> lax.Precision:
  """float32 operands: IEEE products (Triton would otherwise use TF32)."""
  return (lax.Precision.HIGHEST if dtype == jnp.float32
          else lax.Precision.DEFAULT)


def _compiler_params():
  return plgpu.CompilerParams(num_warps=4, num_stages=3)


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array, *, out_dtype, transpose_rhs: bool, tiling,
        interpret: bool = False) -> jax.Array:
  m, k = lhs_MxK.shape
  num_local = rhs_GxKxN.shape[0]
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  tm, tk, tn = tiling or default_tiling(m, k, n)
  _check_tiling((tm, tk, tn))
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

  def kernel(starts_ref, ends_ref, gid_ref, tid_ref, nv_ref, lhs_ref, rhs_ref,
             out_ref):
    v, n_i = pl.program_id(0), pl.program_id(1)

    @pl.when(v < nv_ref[0])
    def _():
      g = gid_ref[v]
      row0 = tid_ref[v] * tm
      rows = row0 + lax.broadcasted_iota(jnp.int32, (tm,), 0)
      in_group = (rows >= starts_ref[g]) & (rows < ends_ref[g])
      cols_n = pl.ds(n_i * tn, tn)

      def k_step(k_i, acc):
        cols_k = pl.ds(k_i * tk, tk)
        a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), cols_k],
                       mask=jnp.broadcast_to(in_group[:, None], (tm, tk)),
                       other=0.0)
        if transpose_rhs:
          b = plgpu.load(rhs_ref.at[g, cols_n, cols_k]).T
        else:
          b = plgpu.load(rhs_ref.at[g, cols_k, cols_n])
        return acc + jnp.dot(a, b, precision=_precision(cdt),
                             preferred_element_type=jnp.float32)

      acc = lax.fori_loop(0, k_tiles, k_step, jnp.zeros((tm, tn), jnp.float32))
      plgpu.store(out_ref.at[pl.ds(row0, tm), cols_n],
                  acc.astype(out_ref.dtype),
                  mask=jnp.broadcast_to(in_group[:, None], (tm, tn)))

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid=(group_ids.shape[0], n_tiles),
      compiler_params=_compiler_params(),
      interpret=interpret,
  )(starts, ends, group_ids, tile_ids, num_visits[None], lhs, rhs)
  keep = _common.block_row_mask(starts, ends, m)
  return jnp.where(keep[:, None], out[:m, :n], 0).astype(out_dtype)


def tgmm(x_MxK: jax.Array, dy_MxN: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array, *, num_actual_groups: int, out_dtype, tiling,
         interpret: bool = False) -> jax.Array:
  m, k = x_MxK.shape
  n = dy_MxN.shape[1]
  tm, tk, tn = tiling or default_tiling(m, k, n)
  _check_tiling((tm, tk, tn))
  cdt = _common.compute_dtype(x_MxK.dtype, dy_MxN.dtype)
  m_pad, k_pad, n_pad = (_common.round_up(m, tm), _common.round_up(k, tk),
                         _common.round_up(n, tn))
  x = _common.pad_axis(_common.pad_axis(x_MxK.astype(cdt), 0, m_pad), 1, k_pad)
  dy = _common.pad_axis(_common.pad_axis(dy_MxN.astype(cdt), 0, m_pad), 1,
                        n_pad)
  starts, ends = _common.local_bounds(group_sizes, group_offset,
                                      num_actual_groups)

  def kernel(starts_ref, ends_ref, x_ref, dy_ref, out_ref):
    g, k_i, n_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    first_tile = start // tm
    last_tile = jnp.where(end > start, (end + tm - 1) // tm, first_tile)
    cols_k, cols_n = pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)

    def m_step(t, acc):
      rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm,), 0)
      in_group = ((rows >= start) & (rows < end))[:, None]
      xs = plgpu.load(x_ref.at[pl.ds(t * tm, tm), cols_k],
                      mask=jnp.broadcast_to(in_group, (tm, tk)), other=0.0)
      ys = plgpu.load(dy_ref.at[pl.ds(t * tm, tm), cols_n],
                      mask=jnp.broadcast_to(in_group, (tm, tn)), other=0.0)
      return acc + jnp.dot(xs.T, ys, precision=_precision(cdt),
                           preferred_element_type=jnp.float32)

    acc = lax.fori_loop(first_tile, last_tile, m_step,
                        jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(out_ref.at[g, cols_k, cols_n], acc.astype(out_ref.dtype))

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_actual_groups, k_pad, n_pad),
                                     out_dtype),
      grid=(num_actual_groups, k_pad // tk, n_pad // tn),
      compiler_params=_compiler_params(),
      interpret=interpret,
  )(starts, ends, x, dy)
  return out[:, :k, :n]
