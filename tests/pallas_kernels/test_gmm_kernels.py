"""Shared test base: every backend available here against the NumPy reference.

Shapes are tiny and fixed per test so each backend compiles a handful of
jitted functions (group sizes are traced arguments) and then runs many cases;
the Pallas kernels run in interpret mode on CPU and use small tiles so that
tiles straddle group boundaries and partial tiles occur.
"""

from __future__ import annotations

import functools
import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import gmm_reference as reference
import kernel_cases as cases
import pallas_kernels as pk

_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2.5e-2}


@pytest.fixture(params=[pytest.param(b, id=b, marks=cases.skip_unless_available(b))
                        for b in pk.BACKENDS])
def backend(request) -> str:
  return request.param


@functools.lru_cache(maxsize=None)
def _gmm_fn(backend: str, transpose_rhs: bool, num_total_groups: int | None):
  """Jitted gmm with traced group sizes and offset (reused across cases)."""
  del num_total_groups  # Part of the cache key only.

  @jax.jit
  def f(lhs, rhs, group_sizes, group_offset):
    return pk.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                  group_offset=group_offset, tiling=cases.TILING[backend],
                  backend=backend)
  return f


@functools.lru_cache(maxsize=None)
def _tgmm_fn(backend: str, num_actual_groups: int):
  @jax.jit
  def f(lhs_KxM, rhs, group_sizes, group_offset):
    return pk.tgmm(lhs_KxM, rhs, group_sizes, group_offset=group_offset,
                   num_actual_groups=num_actual_groups,
                   tiling=cases.TILING[backend], backend=backend)
  return f


@functools.lru_cache(maxsize=None)
def _grad_fn(backend: str, transpose_rhs: bool):
  def loss(lhs, rhs, group_sizes, group_offset, dout):
    out = pk.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                 group_offset=group_offset, tiling=cases.TILING[backend],
                 backend=backend)
    return jnp.sum(out.astype(jnp.float32) * dout)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _rand(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _close(actual, expected, dtype, scale: float = 1.0):
  cases.close(actual, expected, _TOL[dtype] * scale)


# m=37, k=19, n=23: not multiples of any tile.
_M, _K, _N, _G = 37, 19, 23, 5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["nn", "nt"])
def test_gmm_random_group_sizes(backend, dtype, transpose_rhs):
  rng = np.random.default_rng(0)
  lhs = _rand(rng, (_M, _K), dtype)
  rhs = _rand(rng, (_G, _N, _K) if transpose_rhs else (_G, _K, _N), dtype)
  f = _gmm_fn(backend, transpose_rhs, None)

  @cases.SETTINGS
  @given(cases.group_sizes(_G, _M))
  def check(sizes):
    out = f(lhs, rhs, jnp.asarray(sizes), jnp.int32(0))
    assert out.shape == (_M, _N) and out.dtype == dtype
    _close(out, reference.gmm(cases.as_f64(lhs), cases.as_f64(rhs), sizes,
                              transpose_rhs=transpose_rhs), dtype)

  check()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_tgmm_random_group_sizes(backend, dtype):
  rng = np.random.default_rng(1)
  lhs_KxM = _rand(rng, (_K, _M), dtype)
  rhs = _rand(rng, (_M, _N), dtype)
  f = _tgmm_fn(backend, _G)

  @cases.SETTINGS
  @given(cases.group_sizes(_G, _M))
  def check(sizes):
    out = f(lhs_KxM, rhs, jnp.asarray(sizes), jnp.int32(0))
    assert out.shape == (_G, _K, _N) and out.dtype == dtype
    _close(out, reference.tgmm(cases.as_f64(lhs_KxM), cases.as_f64(rhs), sizes), dtype)

  check()


def test_all_rows_in_one_group(backend):
  rng = np.random.default_rng(2)
  lhs, rhs = _rand(rng, (_M, _K), jnp.float32), _rand(rng, (_G, _K, _N),
                                                     jnp.float32)
  lhs_KxM, dy = lhs.T, _rand(rng, (_M, _N), jnp.float32)
  f, t = _gmm_fn(backend, False, None), _tgmm_fn(backend, _G)
  for g in range(_G):
    sizes = np.zeros(_G, np.int32)
    sizes[g] = _M
    _close(f(lhs, rhs, jnp.asarray(sizes), jnp.int32(0)),
           reference.gmm(lhs, rhs, sizes), jnp.float32)
    _close(t(lhs_KxM, dy, jnp.asarray(sizes), jnp.int32(0)),
           reference.tgmm(lhs_KxM, dy, sizes), jnp.float32)


def test_every_empty_group_pattern_g8(backend):
  """All 2^8 patterns of empty/non-empty groups, one compiled function each."""
  num_groups, m, k, n = 8, 29, 16, 16
  rng = np.random.default_rng(3)
  lhs, rhs = _rand(rng, (m, k), jnp.float32), _rand(rng, (num_groups, k, n),
                                                   jnp.float32)
  dy = _rand(rng, (m, n), jnp.float32)
  f, t = _gmm_fn(backend, False, num_groups), _tgmm_fn(backend, num_groups)
  for pattern in itertools.product([0, 1], repeat=num_groups):
    live = np.array(pattern, bool)
    sizes = np.zeros(num_groups, np.int32)
    if live.any():  # Spread m - 3 rows (3 dead rows at the end) over live groups.
      sizes[live] = np.diff(np.linspace(0, m - 3, live.sum() + 1).astype(int))
    gs = jnp.asarray(sizes)
    _close(f(lhs, rhs, gs, jnp.int32(0)), reference.gmm(lhs, rhs, sizes),
           jnp.float32)
    _close(t(lhs.T, dy, gs, jnp.int32(0)), reference.tgmm(lhs.T, dy, sizes),
           jnp.float32)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_group_offset_chaining_over_shards(backend, num_shards):
  """Sum over expert shards of gmm == unsharded gmm; tgmm shards concatenate."""
  num_groups = 8
  per = num_groups // num_shards
  rng = np.random.default_rng(4)
  lhs = _rand(rng, (_M, _K), jnp.float32)
  rhs = _rand(rng, (num_groups, _K, _N), jnp.float32)
  dy = _rand(rng, (_M, _N), jnp.float32)
  f = _gmm_fn(backend, False, num_groups)
  t = _tgmm_fn(backend, per)
  full = _gmm_fn(backend, False, None)
  for sizes in ([5, 0, 7, 3, 0, 9, 4, 2], [0, 0, 0, 0, 0, 0, 20, 0],
                [4, 4, 4, 4, 4, 4, 4, 4]):
    sizes = np.array(sizes, np.int32)
    gs = jnp.asarray(sizes)
    # The offset is traced (jit argument), as inside shard_map.
    total = sum(f(lhs, rhs[s * per:(s + 1) * per], gs, jnp.int32(s * per))
                for s in range(num_shards))
    expected = reference.gmm(lhs, rhs, sizes)
    _close(total, expected, jnp.float32)
    _close(full(lhs, rhs, gs, jnp.int32(0)), expected, jnp.float32)
    for s in range(num_shards):
      _close(f(lhs, rhs[s * per:(s + 1) * per], gs, jnp.int32(s * per)),
             reference.gmm(lhs, rhs[s * per:(s + 1) * per], sizes,
                           group_offset=s * per), jnp.float32)
    parts = [t(lhs.T, dy, gs, jnp.int32(s * per)) for s in range(num_shards)]
    _close(jnp.concatenate(parts), reference.tgmm(lhs.T, dy, sizes),
           jnp.float32)


def test_eager_call_and_group_offset_int(backend):
  """Concrete (validated) path, python-int group_offset."""
  rng = np.random.default_rng(5)
  lhs = _rand(rng, (_M, _K), jnp.float32)
  rhs = _rand(rng, (2, _K, _N), jnp.float32)
  sizes = np.array([3, 10, 6, 0, 11], np.int32)  # sum 30 < m.
  out = pk.gmm(lhs, rhs, jnp.asarray(sizes), group_offset=1,
               tiling=cases.TILING[backend], backend=backend)
  _close(out, reference.gmm(lhs, rhs, sizes, group_offset=1), jnp.float32)
  out = pk.tgmm(lhs.T, _rand(rng, (_M, _N), jnp.float32), jnp.asarray(sizes),
                group_offset=3, num_actual_groups=2, tiling=cases.TILING[backend],
                backend=backend, preferred_element_type=jnp.float32)
  assert out.shape == (2, _K, _N)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["nn", "nt"])
def test_gmm_gradients(backend, dtype, transpose_rhs):
  rng = np.random.default_rng(6)
  num_groups, per = 6, 3
  lhs = _rand(rng, (_M, _K), dtype)
  shape = (num_groups, _N, _K) if transpose_rhs else (num_groups, _K, _N)
  rhs = _rand(rng, shape, dtype)
  dout = _rand(rng, (_M, _N), jnp.float32)
  grad = _grad_fn(backend, transpose_rhs)
  for sizes, offset, local in (([6, 0, 9, 7, 2, 8], 0, num_groups),
                               ([0, 12, 3, 0, 5, 10], 3, per),
                               ([37, 0, 0, 0, 0, 0], 0, num_groups)):
    sizes = np.array(sizes, np.int32)
    w = rhs[offset:offset + local]
    dlhs, drhs = grad(lhs, w, jnp.asarray(sizes), jnp.int32(offset), dout)
    assert dlhs.dtype == dtype and drhs.dtype == dtype
    exp_lhs, exp_rhs = reference.gmm_grads(cases.as_f64(lhs), cases.as_f64(w), sizes,
                                           np.asarray(dout), offset,
                                           transpose_rhs)
    _close(dlhs, exp_lhs, dtype, scale=1.5)
    _close(drhs, exp_rhs, dtype, scale=1.5)


def test_tgmm_gradients(backend):
  rng = np.random.default_rng(7)
  x_KxM, dy = _rand(rng, (_K, _M), jnp.float32), _rand(rng, (_M, _N),
                                                      jnp.float32)
  sizes = np.array([8, 0, 13, 9, 4], np.int32)
  cot = _rand(rng, (_G, _K, _N), jnp.float32)
  f = lambda a, b: jnp.sum(pk.tgmm(a, b, jnp.asarray(sizes),
                                   tiling=cases.TILING[backend],
                                   backend=backend) * cot)
  da, db = jax.jit(jax.grad(f, argnums=(0, 1)))(x_KxM, dy)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  exp_a, exp_b = np.zeros((_K, _M)), np.zeros((_M, _N))
  for g in range(_G):
    lo, hi = bounds[g], bounds[g + 1]
    exp_a[:, lo:hi] = np.asarray(cot[g], np.float64) @ np.asarray(dy[lo:hi]).T
    exp_b[lo:hi] = np.asarray(x_KxM[:, lo:hi]).T @ np.asarray(cot[g])
  _close(da, exp_a, jnp.float32)
  _close(db, exp_b, jnp.float32)


def test_traced_group_sizes_past_m_are_clipped(backend):
  """Documented jit behaviour: groups are cut at row m, later ones empty."""
  rng = np.random.default_rng(8)
  lhs, rhs = _rand(rng, (_M, _K), jnp.float32), _rand(rng, (_G, _K, _N),
                                                     jnp.float32)
  dy = _rand(rng, (_M, _N), jnp.float32)
  sizes = np.array([10, 20, 30, 5, 0], np.int32)  # sum 65 > 37.
  clipped = np.array([10, 20, 7, 0, 0], np.int32)
  _close(_gmm_fn(backend, False, None)(lhs, rhs, jnp.asarray(sizes),
                                       jnp.int32(0)),
         reference.gmm(lhs, rhs, clipped), jnp.float32)
  _close(_tgmm_fn(backend, _G)(lhs.T, dy, jnp.asarray(sizes), jnp.int32(0)),
         reference.tgmm(lhs.T, dy, clipped), jnp.float32)


def test_preferred_element_type(backend):
  rng = np.random.default_rng(9)
  lhs = _rand(rng, (_M, _K), jnp.bfloat16)
  rhs = _rand(rng, (_G, _K, _N), jnp.bfloat16)
  sizes = np.array([7, 7, 7, 7, 9], np.int32)
  out = pk.gmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32,
               tiling=cases.TILING[backend], backend=backend)
  assert out.dtype == jnp.float32
  _close(out, reference.gmm(cases.as_f64(lhs), cases.as_f64(rhs), sizes), jnp.float32,
         scale=10)  # bf16 operands, float32 accumulation and output.


def test_cpu_chunk_classes():
  """1x and 1.5x powers of two times tm, capped at m and at 1024 rows."""
  from pallas_kernels import cpu
  assert cpu._chunk_classes(37, (4, 0, 0)) == [4, 8, 12, 16, 24, 32]
  assert cpu._chunk_classes(5000, None) == [
      16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
  assert cpu._chunk_classes(700, None)[-2:] == [384, 512]
  assert cpu._chunk_classes(3, None) == [16]  # rows are padded to 16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_groups_longer_than_several_top_chunks(dtype):
  """Groups of 2-3 full top chunks plus a head, where m >> the top chunk.

  The shared tests' m is below one top chunk; this covers the accumulating
  top-chunk loop of the cpu backend (1024 rows).
  """
  rng = np.random.default_rng(10)
  m, k, n = 3400, 8, 6
  sizes = np.array([1, 2500, 0, 3, 700], np.int32)  # sum 3204 < m
  lhs, rhs = _rand(rng, (m, k), dtype), _rand(rng, (5, k, n), dtype)
  dy = _rand(rng, (m, n), dtype)
  out = pk.gmm(lhs, rhs, jnp.asarray(sizes), backend="cpu")
  _close(out, reference.gmm(cases.as_f64(lhs), cases.as_f64(rhs), sizes), dtype)
  out_t = pk.tgmm(lhs.T, dy, jnp.asarray(sizes), backend="cpu")
  _close(out_t, reference.tgmm(cases.as_f64(lhs.T), cases.as_f64(dy), sizes), dtype,
         scale=4)  # depth-2500 sums


@functools.lru_cache(maxsize=None)
def _cpu_split_fn(op: str, split: int | None, num_local: int):
  """cpu tgmm / transposed gmm with the batched split forced (or chosen,
  split=None) at tm=4."""
  from pallas_kernels import cpu
  kw = dict(out_dtype=jnp.float32, tiling=(4, 0, 0), split=split, split_min_weights=0)

  @jax.jit
  def f(a, b, group_sizes, group_offset):
    if op == "tgmm":
      return cpu.tgmm(a, b, group_sizes, group_offset, num_actual_groups=num_local, **kw)
    return cpu.gmm(a, b, group_sizes, group_offset, transpose_rhs=True, **kw)
  return f


# The transposed gmm's loop alone (split 0) is what every other gmm test runs.
@pytest.mark.parametrize("op,split", [("tgmm", s) for s in (0, 4, 8, 16, None)]
                         + [("gmm_t", s) for s in (4, 16, None)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@settings(max_examples=8, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_cpu_batched_split(op, split, dtype, data):
  """The first `split` rows of each group in one batched dot, the rest looped.

  Groups shorter and longer than the split, empty groups, rows past the
  live end, and a group block at an offset; None = the cost model's pick
  among all splits (the lax.switch the large-weight case compiles).
  """
  sizes = data.draw(cases.group_sizes(_G, _M))
  offset = data.draw(st.integers(0, 2))
  rng = np.random.default_rng(int(sizes.sum()) + offset)
  x, dy = _rand(rng, (_M, _K), dtype), _rand(rng, (_M, _N), dtype)
  num_local = _G - offset
  f = _cpu_split_fn(op, split, num_local)
  if op == "tgmm":
    out = f(x, dy, jnp.asarray(sizes), jnp.int32(offset))
    want = reference.tgmm(cases.as_f64(x.T), cases.as_f64(dy), sizes, group_offset=offset,
                          num_actual_groups=num_local)
  else:
    rhs = _rand(rng, (num_local, _K, _N), dtype)  # [G, n, k] for lhs dy [m, k=_N]
    out = f(dy, rhs, jnp.asarray(sizes), jnp.int32(offset))
    want = reference.gmm(cases.as_f64(dy), cases.as_f64(rhs), sizes, group_offset=offset,
                         transpose_rhs=True)
  _close(out, want, dtype, scale=4)


def test_cpu_split_choice():
  """Small groups split at their size, large ones stay on the loop, and so do
  Zipf-skewed groups for the transposed gmm; small weights never compile the
  split."""
  from pallas_kernels import cpu
  cands = cpu._split_rows(8192, 16, 64, 512, 1024, cpu._SPLIT_MIN_WEIGHTS)
  assert cands == [16, 32, 64, 128, 256]
  assert cpu._split_rows(8192, 16, 8, 64, 64, cpu._SPLIT_MIN_WEIGHTS) == []
  assert cpu._split_rows(37, 4, 5, 19, 23, 0) == [4, 8, 16, 32]

  def pick(sizes, op):
    idx = int(cpu._pick_split(jnp.asarray(sizes, jnp.int32), cands, op))
    return ([0] + cands)[idx]

  zipf = 1.0 / np.arange(1, 65)
  zipf[32::3] = 0
  zipf = np.floor(zipf / zipf.sum() * 2048).astype(np.int32)
  for op in ("tgmm", "gmm_t"):
    assert pick([32] * 64, op) == 32
    assert pick([128] * 64, op) == 0
    assert pick([1024] * 8 + [0] * 56, op) == 0
  assert pick(zipf, "gmm_t") == 0


def test_cpu_fresh_zeros_are_positive_zero_for_any_operand():
  from pallas_kernels import cpu
  for v in (np.nan, np.inf, -np.inf, -3.0, 0.0, 1e38):
    z = cpu._fresh_zeros((3, 2), jnp.full((2, 2), v, jnp.bfloat16),
                         jnp.full((4,), v, jnp.float32), jnp.zeros((0, 5)))
    assert z.dtype == jnp.float32 and z.shape == (3, 2)
    np.testing.assert_array_equal(np.signbit(np.asarray(z)), False)
    np.testing.assert_array_equal(np.asarray(z), 0.0)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_cpu_non_finite_operands_leave_dead_rows_and_empty_groups_zero(transpose_rhs):
  """Rows past the live end (gmm) and empty groups (tgmm) are exact +0 even
  when dead rows and empty groups' weights hold inf/nan (the first element
  of each operand among them); two gmm calls in one program."""
  rng = np.random.default_rng(3)
  m, k, n = 20, 5, 6
  sizes = jnp.asarray([0, 7, 0], jnp.int32)  # group 1 owns rows 0-6
  lhs = _rand(rng, (m, k), jnp.float32).at[7:].set(jnp.nan).at[-1].set(jnp.inf)
  rhs = _rand(rng, (3, n, k) if transpose_rhs else (3, k, n), jnp.float32)
  rhs = rhs.at[0].set(jnp.nan).at[2].set(-jnp.inf)  # the empty groups
  dy = _rand(rng, (m, n), jnp.float32).at[0, 0].set(-jnp.inf).at[7:].set(jnp.nan)
  x = lhs.at[0, 0].set(jnp.nan)  # tgmm's x: row 0 is live, so keep dy's finite

  @jax.jit
  def f(lhs, rhs, x, dy):
    gmm = functools.partial(pk.gmm, transpose_rhs=transpose_rhs, backend="cpu")
    return gmm(lhs, rhs, sizes), gmm(lhs * 2, rhs, sizes), pk.tgmm(
        x.T, dy.at[:7].set(1.0), sizes, backend="cpu")

  out, out2, dw = (np.asarray(a) for a in f(lhs, rhs, x, dy))
  for o in (out, out2):
    assert np.isfinite(o[:7]).all()
    np.testing.assert_array_equal(o[7:], 0.0)
    assert not np.signbit(o[7:]).any()
  np.testing.assert_array_equal(dw[[0, 2]], 0.0)
  assert not np.signbit(dw[[0, 2]]).any()


def test_gradients_of_a_sum_constant_cotangent(backend):
  """grad of sum(gmm(...)): the cotangent is an XLA constant (all ones),
  which the cpu backend hides behind a barrier (it made XLA rewrite the
  chunk products into a path ~40x slower); values as the reference."""
  rng = np.random.default_rng(12)
  lhs, rhs = _rand(rng, (_M, _K), jnp.float32), _rand(rng, (4, _K, _N), jnp.float32)
  sizes = np.array([9, 0, 14, 6], np.int32)

  @jax.jit
  def grad(lhs, rhs):
    return jax.grad(lambda a, b: jnp.sum(pk.gmm(
        a, b, jnp.asarray(sizes), tiling=cases.TILING[backend], backend=backend)),
        argnums=(0, 1))(lhs, rhs)

  dlhs, drhs = grad(lhs, rhs)
  exp_lhs, exp_rhs = reference.gmm_grads(cases.as_f64(lhs), cases.as_f64(rhs), sizes,
                                         np.ones((_M, _N)), 0, False)
  _close(dlhs, exp_lhs, jnp.float32, scale=1.5)
  _close(drhs, exp_rhs, jnp.float32, scale=1.5)
