"""Fast CPU backend built from ordinary XLA ops.

Why not ragged_dot: on XLA:CPU it costs about G dense matmuls. Here every
group is cut into row chunks whose sizes are powers of two times a minimum
chunk `tm`: as many `tm_max`-row chunks as fit, then one chunk for each set
bit of the remainder rounded up to `tm` (e.g. 700 rows, tm=16, tm_max=512 ->
512 + 128 + 64 rows, the last one 4 rows too long). Each chunk is one
dense dot with that group's weights, so big groups run at dense-matmul speed
and the waste is under `tm` rows per group. Chunks start at the group's first
row (no gather, no padded buffer): they may overhang into the next group and
are masked on write (gmm) or on read (tgmm).

Loops are `fori_loop`s with data-dependent trip counts (the per-class loops
run 0 or 1 times), so the cost follows the live rows: empty groups and rows
past sum(group_sizes) cost nothing but the zero-filled output. The while-loop
carries are updated in place (no conditional copies of the output).

`tiling=(tm, _, _)`: tm is the smallest row chunk (default 16); the largest
is tm times the largest power of two not above 512 rows (float32) or 1024
rows (bfloat16). The k and n entries are ignored: XLA's dot tiles those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common


def _chunk_classes(m_rows: int, tiling, dtype) -> list[int]:
  """Chunk sizes tm * 2**i, ascending, none larger than m_rows."""
  tm = 16 if tiling is None else int(tiling[0])
  tm_max = max(tm, 1024 if dtype == jnp.bfloat16 else 512)
  classes = [tm]
  while classes[-1] * 2 <= min(tm_max, m_rows):
    classes.append(classes[-1] * 2)
  return classes


def _for_each_chunk(start: jax.Array, end: jax.Array, classes: list[int],
                    m_rows: int, body, carry):
  """Runs body(chunk_rows, row0, true_start, carry) over the chunks of [start, end).

  `row0` is where the chunk's slice starts (clamped so it fits in m_rows) and
  `true_start` the first row the chunk is responsible for; rows of the slice
  outside [true_start, end) must be ignored by `body`.
  """
  top = classes[-1]
  size = end - start
  n_top = size // top

  def top_body(i, c):
    r = start + i * top
    return body(top, jnp.minimum(r, m_rows - top), r, c)

  carry = lax.fori_loop(0, n_top, top_body, carry)
  pos = start + n_top * top
  rest = size - n_top * top
  units = (rest + classes[0] - 1) // classes[0]  # remainder in tm units
  for c_rows in reversed(classes):
    bit = (units // (c_rows // classes[0])) % 2
    if c_rows == top:
      # Only when the remainder rounds up to a whole top chunk.
      bit = jnp.where(units * classes[0] == top, 1, 0)

    def one(i, c, c_rows=c_rows, pos=pos):
      # `+ i * c_rows` (i is always 0) keeps the chunk dependent on the loop
      # index; otherwise XLA hoists the loop-invariant dot out of this 0/1-trip
      # loop and computes it even when the loop does not run.
      r = pos + i * c_rows
      return body(c_rows, jnp.minimum(r, m_rows - c_rows), r, c)

    carry = lax.fori_loop(0, bit, one, carry)
    pos = pos + bit * c_rows
  return carry


def _for_each_nonempty_group(starts_G: jax.Array, ends_G: jax.Array, body,
                             carry):
  """fori_loop of body(j, carry) over the groups that own rows only.

  Empty groups cost nothing (not even slicing their weights), so the cost
  follows the live rows and groups.
  """
  nonempty = ends_G > starts_G
  order = jnp.nonzero(nonempty, size=nonempty.shape[0], fill_value=0)[0]
  order = order.astype(jnp.int32)
  count = jnp.sum(nonempty).astype(jnp.int32)
  return lax.fori_loop(0, count, lambda i, c: body(order[i], c), carry)


def _group_weights(rhs_GxAxB: jax.Array, j: jax.Array) -> jax.Array:
  """rhs[j]; for bfloat16 sliced as raw 16-bit words.

  XLA:CPU otherwise rewrites convert(slice(rhs)) into slice(convert(rhs)) and
  hoists a float32 copy of the *whole* weight tensor out of the loop (256 MB
  at G=64), which made bfloat16 slower than float32.
  """
  if rhs_GxAxB.dtype != jnp.bfloat16:
    return lax.dynamic_index_in_dim(rhs_GxAxB, j, 0, keepdims=False)
  raw = lax.bitcast_convert_type(rhs_GxAxB, jnp.uint16)
  raw_j = lax.dynamic_index_in_dim(raw, j, 0, keepdims=False)
  return lax.bitcast_convert_type(raw_j, jnp.bfloat16)


def _prepare_rows(x: jax.Array, classes: list[int]) -> jax.Array:
  """Pads tiny inputs so the smallest chunk fits."""
  return _common.pad_axis(x, 0, max(x.shape[0], classes[0]))


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array, *, out_dtype, transpose_rhs: bool,
        tiling) -> jax.Array:
  m, k = lhs_MxK.shape
  num_local = rhs_GxKxN.shape[0]
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  cdt = _common.compute_dtype(lhs_MxK.dtype, rhs_GxKxN.dtype)
  classes = _chunk_classes(m, tiling, cdt)
  lhs = _prepare_rows(lhs_MxK.astype(cdt), classes)
  rhs = rhs_GxKxN.astype(cdt)
  m_rows = lhs.shape[0]
  starts, ends = _common.local_bounds(group_sizes, group_offset, num_local)
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

  def group_body(j, out_MxN):
    w = _group_weights(rhs, j)
    end = ends[j]

    def chunk(c_rows, row0, true_start, out):
      x = lax.dynamic_slice_in_dim(lhs, row0, c_rows, 0)
      y = lax.dot_general(x, w, (contract, ((), ())),
                          preferred_element_type=jnp.float32)
      rows = row0 + lax.iota(jnp.int32, c_rows)
      keep = (rows >= true_start) & (rows < end)
      old = lax.dynamic_slice_in_dim(out, row0, c_rows, 0)
      new = jnp.where(keep[:, None], y, old)
      return lax.dynamic_update_slice_in_dim(out, new, row0, 0)

    return _for_each_chunk(starts[j], end, classes, m_rows, chunk, out_MxN)

  # The carry stays float32: XLA:CPU has no bfloat16 dynamic-update-slice and
  # would convert (and copy) the whole buffer around every chunk.
  out = jnp.zeros((m_rows, n), jnp.float32)
  out = _for_each_nonempty_group(starts, ends, group_body, out)
  return out[:m].astype(out_dtype)


def tgmm(x_MxK: jax.Array, dy_MxN: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array, *, num_actual_groups: int, out_dtype,
         tiling) -> jax.Array:
  m, k = x_MxK.shape
  n = dy_MxN.shape[1]
  cdt = _common.compute_dtype(x_MxK.dtype, dy_MxN.dtype)
  classes = _chunk_classes(m, tiling, cdt)
  x = _prepare_rows(x_MxK.astype(cdt), classes)
  dy = _prepare_rows(dy_MxN.astype(cdt), classes)
  m_rows = x.shape[0]
  starts, ends = _common.local_bounds(group_sizes, group_offset,
                                      num_actual_groups)

  def group_body(j, out_GxKxN):
    end = ends[j]

    # Chunks accumulate straight into the output slot of group j (float32
    # output) -- a separate accumulator costs an extra [k, n] pass per chunk.
    def chunk(c_rows, row0, true_start, out):
      rows = row0 + lax.iota(jnp.int32, c_rows)
      keep = ((rows >= true_start) & (rows < end))[:, None]
      xs = jnp.where(keep, lax.dynamic_slice_in_dim(x, row0, c_rows, 0), 0)
      ys = jnp.where(keep, lax.dynamic_slice_in_dim(dy, row0, c_rows, 0), 0)
      part = lax.dot_general(xs, ys, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
      prev = lax.dynamic_index_in_dim(out, j, 0, keepdims=False)
      return lax.dynamic_update_index_in_dim(out, prev + part, j, 0)

    return _for_each_chunk(starts[j], end, classes, m_rows, chunk, out_GxKxN)

  out = jnp.zeros((num_actual_groups, k, n), jnp.float32)
  return _for_each_nonempty_group(starts, ends, group_body,
                                  out).astype(out_dtype)
