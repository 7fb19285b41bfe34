"""grouped_swiglu on every backend here against the NumPy float64 reference.

The `cpu` backend runs the fused loops (pallas_kernels/cpu_swiglu.py); the
others compose gmm/tgmm. Group sizes and offsets are traced arguments, so
each (backend, shape, dtype) compiles once and then runs many cases.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import gmm_reference as reference
import kernel_cases as cases
import pallas_kernels as pk
from pallas_kernels import cpu_swiglu

_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
# m=37, d=19: no tile multiples. f=23 > d (the composed path scales the
# outputs) and f=11 < d (it scales the hidden rows).
_M, _D, _G = 37, 19, 5
_SIZES = [np.array(s, np.int32) for s in (
    [7, 0, 12, 3, 9],     # an empty group, 6 dead rows
    [0, 0, 37, 0, 0],     # all rows in one group
    [5, 6, 7, 8, 11],     # every row live
    [0, 0, 0, 0, 0],      # nothing live
    [1, 1, 1, 1, 1])]     # groups smaller than a chunk


def _cases():
  """(backend, dtype, f, scale): every combination on the accelerators; on
  cpu and xla each dtype with and without scale (f alternating, so both of
  the composed path's scale placements run); one on each Pallas
  interpreter (their gmm kernels have their own test base)."""
  every = [(dt, f, s) for dt in (jnp.float32, jnp.bfloat16) for f in (23, 11)
           for s in (True, False)]
  pairs = [(jnp.float32, 23, True), (jnp.float32, 11, False),
           (jnp.bfloat16, 11, True), (jnp.bfloat16, 23, False)]
  for b in pk.BACKENDS:
    combos = (every if b in cases.ACCELERATOR_BACKENDS else pairs[:1]
              if b in cases.INTERPRET else pairs)
    for dt, f, s in combos:
      yield pytest.param(b, dt, f, s, marks=cases.skip_unless_available(b),
                         id=f"{b}-{jnp.dtype(dt).name}-f{f}-{'scale' if s else 'noscale'}")


def _operands(seed: int, f: int, dtype, m: int = _M, g: int = _G):
  rng = np.random.default_rng(seed)
  r = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
  x, dy = r(m, _D), jnp.asarray(rng.standard_normal((m, _D)), jnp.float32)
  ws = (r(g, _D, f) / np.sqrt(_D), r(g, _D, f) / np.sqrt(_D), r(g, f, _D) / np.sqrt(f))
  s = jnp.asarray(rng.uniform(0.2, 1.0, m), jnp.float32)
  return x, ws, s, dy


@functools.lru_cache(maxsize=None)
def _fns(backend: str, with_scale: bool):
  """Jitted (forward, grads of sum(out * dy)) with traced sizes and offset."""
  def fwd(x, wg, wu, wd, s, sizes, offset):
    return pk.grouped_swiglu(x, wg, wu, wd, sizes, scale=s if with_scale else None,
                             group_offset=offset, tiling=cases.TILING[backend],
                             backend=backend)

  def loss(x, wg, wu, wd, s, sizes, offset, dy):
    return jnp.sum(fwd(x, wg, wu, wd, s, sizes, offset) * dy)
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


_f64 = cases.as_f64


def _close(actual, expected, dtype, scale: float = 1.0):
  cases.close(actual, expected, _TOL[dtype] * scale)


def _check(backend, dtype, with_scale, x, ws, s, dy, sizes, offset=0):
  fwd, grad = _fns(backend, with_scale)
  args = (x, *ws, s, jnp.asarray(sizes), jnp.int32(offset))
  ref_args = (*map(_f64, (x, *ws)), sizes, _f64(dy), s if with_scale else None, offset)
  y_ref, grads_ref = reference.grouped_swiglu_grads(*ref_args)
  y = fwd(*args)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  _close(y, y_ref, dtype)
  grads = grad(*args, dy)
  names = ("x", "w_gate", "w_up", "w_down", "scale")
  for name, a, got, want in zip(names, (x, *ws, s), grads, grads_ref):
    assert got.dtype == a.dtype, name
    if name == "scale" and not with_scale:
      want = np.zeros_like(want)
    _close(got, want, dtype, scale=2.0)


@pytest.mark.parametrize("backend,dtype,f,with_scale", list(_cases()))
def test_matches_reference(backend, dtype, f, with_scale):
  x, ws, s, dy = _operands(0, f, dtype)
  for sizes in _SIZES:
    _check(backend, dtype, with_scale, x, ws, s, dy, sizes)


@pytest.mark.parametrize("backend", ["cpu", "xla"])
@pytest.mark.parametrize("num_shards", [2, 5])
def test_group_offset_chaining_over_shards(backend, num_shards):
  """Each shard holds G/num_shards consecutive groups: outputs and dx add up
  to the unsharded ones, each shard's weight gradients are its slice."""
  g = 10
  x, ws, s, dy = _operands(1, 23, jnp.float32, g=g)
  sizes = np.array([3, 0, 5, 4, 6, 0, 7, 2, 4, 1], np.int32)  # 32 of 37 rows
  fwd, grad = _fns(backend, True)
  full = grad(x, *ws, s, jnp.asarray(sizes), jnp.int32(0), dy)
  y_sum, dx_sum, ds_sum = 0, 0, 0
  per = g // num_shards
  for i in range(num_shards):
    w_i = tuple(w[i * per:(i + 1) * per] for w in ws)
    args = (x, *w_i, s, jnp.asarray(sizes), jnp.int32(i * per))
    y_sum = y_sum + fwd(*args)
    dx, dwg, dwu, dwd, ds = grad(*args, dy)
    dx_sum, ds_sum = dx_sum + dx, ds_sum + ds
    for got, want in zip((dwg, dwu, dwd), full[1:4]):
      _close(got, _f64(want[i * per:(i + 1) * per]), jnp.float32)
  _close(y_sum, reference.grouped_swiglu(*map(_f64, (x, *ws)), sizes, s), jnp.float32)
  _close(dx_sum, _f64(full[0]), jnp.float32)
  _close(ds_sum, _f64(full[4]), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cpu_fused_random_group_sizes(dtype):
  x, ws, s, dy = _operands(2, 11, dtype)

  @cases.SETTINGS
  @given(cases.group_sizes(_G, _M))
  def run(sizes):
    _check("cpu", dtype, True, x, ws, s, dy, sizes)
  run()


def test_cpu_fused_groups_longer_than_several_top_chunks():
  """Groups of several top chunks plus a head, m > the 1024-row top chunk."""
  m, f = 2600, 8
  x, ws, s, dy = _operands(3, f, jnp.float32, m=m, g=3)
  sizes = np.array([1100, 0, 1450], np.int32)  # head 76 + 1024; 426 + 1024
  fwd, grad = _fns("xla", True)
  fwd_c = jax.jit(lambda *a: pk.grouped_swiglu(*a[:4], a[5], scale=a[4], backend="cpu"))
  args = (x, *ws, s, jnp.asarray(sizes))
  y_ref, grads_ref = reference.grouped_swiglu_grads(*map(_f64, (x, *ws)), sizes, _f64(dy), s)
  _close(fwd_c(*args), y_ref, jnp.float32)
  loss = lambda *a: jnp.sum(fwd_c(*a) * dy)  # noqa: E731
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
  for got, want in zip(grads, grads_ref):
    _close(got, want, jnp.float32)


def test_cpu_fused_non_finite_rows_outside_the_groups_stay_out():
  """Dead rows and empty groups' weights holding inf/nan leave the live
  outputs, the dead rows' outputs (zero) and every gradient finite."""
  x, (wg, wu, wd), s, dy = _operands(4, 11, jnp.float32)
  sizes = np.array([7, 0, 12, 3, 9], np.int32)  # rows 31.. dead, group 1 empty
  x = x.at[31:].set(jnp.nan).at[-1].set(jnp.inf)
  s = s.at[31:].set(jnp.inf)
  dy = dy.at[31:].set(jnp.nan)
  wg, wu, wd = (w.at[1].set(jnp.nan) for w in (wg, wu, wd))
  fwd, grad = _fns("cpu", True)
  args = (x, wg, wu, wd, s, jnp.asarray(sizes), jnp.int32(0))
  y = fwd(*args)
  np.testing.assert_array_equal(np.asarray(y[31:]), 0.0)
  clean = lambda a: np.nan_to_num(_f64(a), nan=0.0, posinf=0.0)  # noqa: E731
  y_ref, grads_ref = reference.grouped_swiglu_grads(
      *map(clean, (x, wg, wu, wd)), sizes, clean(dy), clean(s))
  _close(y, y_ref, jnp.float32)
  for got, want in zip(grad(*args, dy), grads_ref):
    assert np.isfinite(np.asarray(got)).all()
    _close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_gradients_of_a_sum_constant_cotangent(backend):
  """sum(out): an all-ones cotangent XLA could fold into the products."""
  x, ws, s, _ = _operands(5, 23, jnp.float32)
  sizes = _SIZES[0]
  f = lambda *a: jnp.sum(pk.grouped_swiglu(  # noqa: E731
      *a[:4], jnp.asarray(sizes), scale=a[4], backend=backend))
  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(x, *ws, s)
  _, want = reference.grouped_swiglu_grads(*map(_f64, (x, *ws)), sizes,
                                           np.ones((_M, _D)), s)
  for got, w in zip(grads, want):
    _close(got, w, jnp.float32)


def test_cpu_forward_without_residuals_matches():
  """The primal (no gradient) pass writes only y; same values as with g, u."""
  x, (wg, wu, wd), s, _ = _operands(6, 11, jnp.float32)
  sizes, off = jnp.asarray(_SIZES[0]), jnp.int32(0)
  kw = dict(cdt=jnp.dtype(jnp.float32), has_scale=True, tiling=None)
  y0, g0, u0 = cpu_swiglu.forward(x, wg, wu, wd, s, sizes, off, residuals=False, **kw)
  y1, g1, u1 = cpu_swiglu.forward(x, wg, wu, wd, s, sizes, off, residuals=True, **kw)
  assert g0 is None and u0 is None
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
  group_R = np.repeat(np.arange(_G), _SIZES[0])  # the 31 live rows' groups
  for w, got in ((wg, g1), (wu, u1)):
    want = np.einsum("rd,rdf->rf", _f64(x[:31]), _f64(w)[group_R])
    _close(got[:31], want, jnp.float32)
  np.testing.assert_array_equal(np.asarray(g1[31:]), 0.0)
  np.testing.assert_array_equal(np.asarray(u1[31:]), 0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=np.zeros((4, 3, 2), np.float32)), r"x must have rank 2"),
    (dict(x=np.zeros((37, 19), np.int32)), r"x has dtype int32"),
    (dict(w_gate=np.zeros((5, 18, 11), np.float32)), r"x has d=19"),
    (dict(w_up=np.zeros((5, 19, 12), np.float32)), r"w_up has shape \(5, 19, 12\)"),
    (dict(w_down=np.zeros((5, 19, 11), np.float32)), r"w_down has shape \(5, 19, 11\)"),
    (dict(scale=np.zeros((36,), np.float32)), r"scale has shape \(36,\)"),
    (dict(compute_dtype=jnp.int8), r"compute_dtype=int8"),
    (dict(group_sizes=np.array([10, 30, 0, 0, 0], np.int32)), r"sums to 40"),
    (dict(group_sizes=np.array([10, 3, 0, 0], np.int32)), r"hold 5 groups"),
    (dict(group_offset=2, group_sizes=np.array([1] * 6, np.int32)), r"group_offset=2"),
    (dict(backend="cuda"), r"backend='cuda' is unknown"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  f = 11
  args = dict(x=np.zeros((_M, _D), np.float32), w_gate=np.zeros((_G, _D, f), np.float32),
              w_up=np.zeros((_G, _D, f), np.float32), w_down=np.zeros((_G, f, _D), np.float32),
              group_sizes=np.array(_SIZES[0]))
  args.update(kwargs)
  pos = [jnp.asarray(args.pop(k)) for k in ("x", "w_gate", "w_up", "w_down", "group_sizes")]
  with pytest.raises(ValueError, match=match):
    pk.grouped_swiglu(*pos, **args)
