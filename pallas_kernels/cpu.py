"""Fast CPU backend built from ordinary XLA ops.

Why not ragged_dot: on XLA:CPU it costs about G dense matmuls. Here each
group is cut into row chunks, and each chunk is one dense dot with that
group's weights, so big groups run at dense-matmul speed. A group of s rows
gets one *head* chunk covering its first r rows, r = s - top * floor((s-1) /
top) in (0, top], rounded up to the smallest chunk class >= r, then
floor((s-1) / top) chunks of `top` rows. The classes are tm * 2**i and
1.5 * tm * 2**i up to `top`, so the head wastes under a third of its rows
(and at most tm - 1 for tiny groups) while a group never costs more than one
partial chunk: each extra chunk costs a fresh pass over the group's weights
(gmm) or over its [k, n] output slice (tgmm), which at G=64 costs more than
the padded rows. Chunks start at a row of the group (no gather, no padded
buffer); only the head can overhang its rows and is masked on write (gmm) or
on read (tgmm). The head comes first so that tgmm can write its output slice
without reading it; the full `top` chunks that follow need no mask.

tgmm and the transposed gmm (the backward's d(lhs)) with many small groups
(and weights of at least 2M elements) first put each group's first c rows
through one batched dot, c picked per call by a cost model (see "The
batched split" below); the chunk loop then only does the rows past c.

Loops are `fori_loop`s with data-dependent trip counts (the per-class loops
run 0 or 1 times), so the cost follows the live rows: empty groups and rows
past sum(group_sizes) cost nothing but the zero-filled output. The while-loop
carries are updated in place (no conditional copies of the output).

`tiling=(tm, _, _)`: tm is the smallest row chunk (default 16); `top` is the
largest class not above 1024 rows and not above m (512 measured ~5% slower
for the backward products at m=65536, G=64). The k and n entries are
ignored: XLA's dot tiles those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common


def _chunk_classes(m_rows: int, tiling) -> list[int]:
  """Ascending chunk sizes tm * 2**i and 1.5 * tm * 2**i (>= 3 tm), <= cap.

  cap = min(m_rows, 1024), at least tm.
  """
  tm = 16 if tiling is None else int(tiling[0])
  cap = max(tm, min(m_rows, 1024))
  classes, c = [], tm
  while c <= cap:
    classes.append(c)
    if c >= 2 * tm and c * 3 // 2 <= cap:
      classes.append(c * 3 // 2)
    c *= 2
  return classes


def _for_each_chunk(start: jax.Array, end: jax.Array, classes: list[int],
                    m_rows: int, head_body, top_body, carry):
  """Runs the head chunk, then the full top chunks, of the rows [start, end).

  head_body(c_rows, row0, keep_C, carry): a chunk of c_rows rows sliced at
  row0 (clamped so it fits in m_rows) of which only the rows with keep_C
  are the group's; the others must be ignored. Runs once for a non-empty
  group.
  top_body(row0, carry): exactly the top-class rows [row0, row0 + top), all
  the group's.
  """
  top = classes[-1]
  n_top = jnp.maximum(end - start - 1, 0) // top
  head = end - start - n_top * top  # in (0, top] for a non-empty group
  lo_rows = 0
  for c_rows in classes:
    run = ((head > lo_rows) & (head <= c_rows)).astype(jnp.int32)

    def one(i, c, c_rows=c_rows):
      # `+ i` (i is always 0) keeps the chunk dependent on the loop index;
      # otherwise XLA hoists the loop-invariant dot out of this 0/1-trip loop
      # and computes it even when the loop does not run.
      r = start + i
      row0 = jnp.minimum(r, m_rows - c_rows)
      rows = row0 + lax.iota(jnp.int32, c_rows)
      return head_body(c_rows, row0, (rows >= r) & (rows < r + head), c)

    carry = lax.fori_loop(0, run, one, carry)
    lo_rows = c_rows
  first = start + head
  return lax.fori_loop(0, n_top, lambda i, c: top_body(first + i * top, c),
                       carry)


def _for_each_nonempty_group(starts_G: jax.Array, ends_G: jax.Array, body,
                             carry):
  """fori_loop of body(j, start, end, carry) over the groups that own rows.

  Empty groups cost nothing (not even slicing their weights), so the cost
  follows the live rows and groups.
  """
  nonempty = ends_G > starts_G
  order = jnp.nonzero(nonempty, size=nonempty.shape[0], fill_value=0)[0]
  order = order.astype(jnp.int32)
  count = jnp.sum(nonempty).astype(jnp.int32)
  def step(i, c):
    j = order[i]
    return body(j, starts_G[j], ends_G[j], c)

  return lax.fori_loop(0, count, step, carry)


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


def _fresh_zeros(shape: tuple[int, ...], *operands: jax.Array) -> jax.Array:
  """Float32 zeros that XLA will not share with another gmm/tgmm call's zeros.

  A program with several calls (a SwiGLU layer's fwd+bwd has nine) would
  otherwise get one CSE'd zero buffer plus a copy of it per while loop: a
  fill, then a read and a write per call, instead of one fill per call (at
  G=64 in the MoE layer, 3 x 128 MB + 3 x 64 MB of copies per step; the
  layer's experts ran 3-6% faster without them). Tying the value to this
  call's operands keeps each fill separate and in place; it is +0.0 for any
  operand values, inf and nan included.
  """
  s = sum(jnp.abs(o.reshape(-1)[0]).astype(jnp.float32) for o in operands
          if o.size)
  zero = jnp.where(jnp.isfinite(s), s * 0, 0).astype(jnp.float32)
  return jnp.broadcast_to(zero, shape)


def _opaque(*operands: jax.Array) -> tuple[jax.Array, ...]:
  """The operands behind an optimization barrier.

  With a constant operand (the all-ones cotangent of `sum(gmm(...))`)
  XLA's simplifier rewrites the per-chunk dots of the loop into something
  far slower: gmm of an all-ones [8192, 1024] lhs took 563 ms instead of
  13. The barrier hides the constant; it copies nothing.
  """
  return lax.optimization_barrier(operands)


def _write_rows(buf: jax.Array, value: jax.Array, row0: jax.Array,
                keep: jax.Array | None = None) -> jax.Array:
  """buf[row0:row0 + c] = value (c = len(value)), keeping buf's rows where
  `keep` (a head chunk's row mask) is False."""
  if keep is not None:
    old = lax.dynamic_slice_in_dim(buf, row0, value.shape[0], 0)
    mask = keep.reshape(keep.shape + (1,) * (value.ndim - 1))
    value = jnp.where(mask, value, old)
  return lax.dynamic_update_slice_in_dim(buf, value, row0, 0)


def _write_group(buf_GxAxB: jax.Array, j: jax.Array, value: jax.Array,
                 first: bool) -> jax.Array:
  """buf[j] = value (a group's first chunk: no read) or buf[j] += value."""
  if not first:
    value = lax.dynamic_index_in_dim(buf_GxAxB, j, 0, keepdims=False) + value
  return lax.dynamic_update_index_in_dim(buf_GxAxB, value, j, 0)


def _prepare_rows(x: jax.Array, classes: list[int]) -> jax.Array:
  """Pads tiny inputs so the smallest chunk fits."""
  return _common.pad_axis(x, 0, max(x.shape[0], classes[0]))


# The batched split (tgmm, and gmm with transpose_rhs): when groups are
# small, their first c rows go through one batched dot over gathered, masked
# rows, and only rows past c through the chunk loop. The loop pays per group
# whatever its size: tgmm copies the group's [k, n] product into its output
# (XLA:CPU cannot write a dot into a dynamic slice) after zero-filling the
# whole output, gmm copies the group's weights out of rhs; the batched dot
# reads rhs in place and writes tgmm's [G, k, n] output once. Padded and
# small-M batched rows cost more than loop rows, so `_pick_split` weighs the
# two with a cost model in units of one loop row: a group in the loop costs
# OVH + its rows, a batched row BETA (padding included); both scale with
# k n, so to first order they do not depend on the shape. Fitted on the
# 2-core dev box (m=8192, k=512, n=1024, G=64, float32, every split forced):
# tgmm OVH 120, BETA 2.2 (groups of 32 rows split, 20.5 -> 11.8 ms; groups
# of 128 do not); gmm with transpose_rhs OVH 46, BETA 2.0 (groups of 32 rows:
# loop 11.9 ms, 64 x 128 loop 26.5 ms, c=32 9.4 ms; Zipf-skewed groups at
# m/4 stay on the loop, 11.6 vs 13.0 ms at c=16). gmm without transposition
# gains nothing (its batched dot is as slow as the loop; the [G, n, k]-weights
# form of the transposed one is what makes that one fast), so it stays on the
# loop. Weights under _SPLIT_MIN_WEIGHTS elements never split and do not
# compile the batched branches.
_SPLIT_COST = {"tgmm": (120.0, 2.2), "gmm_t": (46.0, 2.0)}  # (OVH, BETA)
_SPLIT_MAX_ROWS = 256
_SPLIT_MIN_WEIGHTS = 1 << 21


def _split_rows(m_rows: int, tm: int, num_groups: int, k: int, n: int,
                min_weights: int) -> list[int]:
  """Candidate c (tm * 2**i, <= min(m_rows, 256)) for the batched split.

  tm: the smallest chunk class (`_chunk_classes(...)[0]`).
  """
  if num_groups < 2 or num_groups * k * n < min_weights:
    return []
  out, c = [], tm
  while c <= min(m_rows, _SPLIT_MAX_ROWS):
    out.append(c)
    c *= 2
  return out


def _pick_split(sizes_G: jax.Array, cands: list[int], op: str) -> jax.Array:
  """Index into [0] + cands of the cheapest split under op's cost model."""
  ovh, beta = _SPLIT_COST[op]
  s = sizes_G.astype(jnp.float32)

  def loop_cost(c):
    rest = jnp.maximum(s - c, 0)
    return jnp.sum(jnp.where(rest > 0, ovh + rest, 0))

  g = sizes_G.shape[0]
  costs = [loop_cost(0)] + [beta * g * c + loop_cost(c) for c in cands]
  return jnp.argmin(jnp.stack(costs)).astype(jnp.int32)


def _first_rows(starts_G: jax.Array, ends_G: jax.Array, c: int
                ) -> tuple[jax.Array, jax.Array]:
  """[G, c] row index of each group's first c rows (0 where past its end)."""
  rows = starts_G[:, None] + lax.iota(jnp.int32, c)[None, :]
  keep = rows < ends_G[:, None]
  return jnp.where(keep, rows, 0), keep


def _with_split(cands: list[int], split: int | None, sizes_G, run, op: str):
  """run(c) for the split op's cost model (or `split`, if given) picks."""
  if split is not None:
    return run(split)
  if not cands:
    return run(0)
  idx = _pick_split(sizes_G, cands, op)
  return lax.switch(idx, [lambda c=c: run(c) for c in [0] + cands])


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array, *, out_dtype, transpose_rhs: bool,
        tiling, split: int | None = None,
        split_min_weights: int = _SPLIT_MIN_WEIGHTS) -> jax.Array:
  """`split`: force the batched split's c (transpose_rhs only; tests use it)."""
  m, k = lhs_MxK.shape
  num_local = rhs_GxKxN.shape[0]
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  cdt = _common.compute_dtype(lhs_MxK.dtype, rhs_GxKxN.dtype)
  classes = _chunk_classes(m, tiling)
  lhs, rhs = _opaque(_prepare_rows(lhs_MxK.astype(cdt), classes),
                     rhs_GxKxN.astype(cdt))
  m_rows = lhs.shape[0]
  starts, ends = _common.local_bounds(group_sizes, group_offset, num_local)
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

  def group_body(j, start, end, out_MxN):
    w = _group_weights(rhs, j)

    def product(c_rows, row0):
      x = lax.dynamic_slice_in_dim(lhs, row0, c_rows, 0)
      return lax.dot_general(x, w, (contract, ((), ())),
                             preferred_element_type=jnp.float32)

    def head(c_rows, row0, keep, out):
      return _write_rows(out, product(c_rows, row0), row0, keep)

    def top(row0, out):
      return _write_rows(out, product(classes[-1], row0), row0)

    return _for_each_chunk(start, end, classes, m_rows, head, top, out_MxN)

  def run(c):
    # The carry stays float32: XLA:CPU has no bfloat16 dynamic-update-slice
    # and would convert (and copy) the whole buffer around every chunk.
    out = _fresh_zeros((m_rows, n), lhs, rhs)
    if not c:
      return _for_each_nonempty_group(starts, ends, group_body, out)
    rows_GxC, keep_GxC = _first_rows(starts, ends, c)
    xs = jnp.where(keep_GxC[..., None], jnp.take(lhs, rows_GxC, axis=0), 0)
    # rhs [G, n, k] times the rows as [G, n, c], then transposed: the
    # weights stay the left operand, read in place (the [G, c, n] form is
    # 1.7x slower); the barrier keeps XLA from folding the transpose into
    # the dot's output layout, which made it 2x slower.
    p = lax.dot_general(rhs, xs, (((2,), (2,)), ((0,), (0,))),
                        preferred_element_type=jnp.float32)
    p = jnp.swapaxes(lax.optimization_barrier(p), 1, 2).reshape(-1, n)
    dst = jnp.where(keep_GxC, rows_GxC, m_rows).reshape(-1)
    out = out.at[dst].set(p, mode="drop", unique_indices=True)
    return _for_each_nonempty_group(jnp.minimum(starts + c, ends), ends,
                                    group_body, out)

  cands = (_split_rows(m_rows, classes[0], num_local, k, n, split_min_weights)
           if transpose_rhs else [])
  out = _with_split(cands, split if transpose_rhs else None, ends - starts,
                    run, "gmm_t")
  return out[:m].astype(out_dtype)


def tgmm(x_MxK: jax.Array, dy_MxN: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array, *, num_actual_groups: int, out_dtype,
         tiling, split: int | None = None,
         split_min_weights: int = _SPLIT_MIN_WEIGHTS) -> jax.Array:
  """`split`: force the batched split's c (0: loop only); tests use it."""
  m, k = x_MxK.shape
  n = dy_MxN.shape[1]
  cdt = _common.compute_dtype(x_MxK.dtype, dy_MxN.dtype)
  classes = _chunk_classes(m, tiling)
  x, dy = _opaque(_prepare_rows(x_MxK.astype(cdt), classes),
                  _prepare_rows(dy_MxN.astype(cdt), classes))
  m_rows = x.shape[0]
  starts, ends = _common.local_bounds(group_sizes, group_offset,
                                      num_actual_groups)

  def product(c_rows, row0, keep=None):
    xs = lax.dynamic_slice_in_dim(x, row0, c_rows, 0)
    ys = lax.dynamic_slice_in_dim(dy, row0, c_rows, 0)
    if keep is not None:  # both masked: a row outside may hold inf/nan
      xs, ys = jnp.where(keep, xs, 0), jnp.where(keep, ys, 0)
    return lax.dot_general(xs, ys, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)

  def loop(first_G, out_GxKxN, after_split: bool):
    def group_body(j, start, end, out):
      # Without a split the head chunk writes group j's slot without reading
      # it; the top chunks accumulate into it in place (a separate
      # accumulator costs an extra [k, n] pass per chunk).
      def head(c_rows, row0, keep, out):
        p = product(c_rows, row0, keep[:, None])
        return _write_group(out, j, p, first=not after_split)

      def top(row0, out):
        return _write_group(out, j, product(classes[-1], row0), first=False)

      return _for_each_chunk(start, end, classes, m_rows, head, top, out)
    return _for_each_nonempty_group(first_G, ends, group_body, out_GxKxN)

  def run(c):
    if not c:
      out = _fresh_zeros((num_actual_groups, k, n), x, dy)
      return loop(starts, out, after_split=False)
    rows_GxC, keep_GxCx1 = _first_rows(starts, ends, c)
    keep_GxCx1 = keep_GxCx1[..., None]  # both masked: see product()
    xs = jnp.where(keep_GxCx1, jnp.take(x, rows_GxC, axis=0), 0)
    ys = jnp.where(keep_GxCx1, jnp.take(dy, rows_GxC, axis=0), 0)
    out = lax.dot_general(xs, ys, (((1,), (1,)), ((0,), (0,))),
                          preferred_element_type=jnp.float32)
    return loop(jnp.minimum(starts + c, ends), out, after_split=True)

  cands = _split_rows(m_rows, classes[0], num_actual_groups, k, n,
                      split_min_weights)
  out = _with_split(cands, split, ends - starts, run, "tgmm")
  return out.astype(out_dtype)
