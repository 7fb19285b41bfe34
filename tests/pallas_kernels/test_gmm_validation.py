"""Argument validation and backend selection (backend-independent)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

_LHS = jnp.ones((8, 4), jnp.float32)
_RHS = jnp.ones((2, 4, 3), jnp.float32)
_GS = jnp.array([3, 5], jnp.int32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lhs=jnp.ones((8,), jnp.float32)), r"lhs must have rank 2.*\(8,\)"),
    (dict(rhs=jnp.ones((4, 3), jnp.float32)), r"rhs must have rank 3"),
    (dict(lhs=jnp.ones((8, 4), jnp.int32)), r"lhs has dtype int32; supported"),
    (dict(rhs=jnp.ones((2, 4, 3), jnp.float16)), r"rhs has dtype float16"),
    (dict(rhs=jnp.ones((2, 5, 3), jnp.float32)), r"contracting dim.*5.*k=4"),
    (dict(group_sizes=jnp.array([3, 5], jnp.int64)
          if jax.config.jax_enable_x64 else jnp.array([3.0, 5.0])),
     r"group_sizes has dtype .*int32"),
    (dict(group_sizes=jnp.array([[3, 5]], jnp.int32)), r"group_sizes must have"),
    (dict(group_sizes=jnp.array([6, 5], jnp.int32)), r"sums to 11.*8 rows"),
    (dict(group_sizes=jnp.array([-1, 5], jnp.int32)), r"non-negative.*-1"),
    (dict(group_sizes=jnp.array([8], jnp.int32)), r"rhs holds 2 groups.*1"),
    (dict(group_offset=1), r"group_offset=1 .*allowed: 0 <= group_offset <= 0"),
    (dict(group_offset=jnp.array([0, 1], jnp.int32)), r"group_offset must be"),
    (dict(preferred_element_type=jnp.int8), r"preferred_element_type=int8"),
    (dict(tiling=(8, 8)), r"tiling=\(8, 8\) must be None or a tuple of three"),
    (dict(backend="cuda"), r"backend='cuda' is unknown; allowed: 'auto'"),
])
def test_gmm_validation_errors(kwargs, match):
  args = dict(lhs=_LHS, rhs=_RHS, group_sizes=_GS)
  args.update(kwargs)
  lhs, rhs, gs = args.pop("lhs"), args.pop("rhs"), args.pop("group_sizes")
  args.setdefault("backend", "xla")
  with pytest.raises(ValueError, match=match):
    pk.gmm(lhs, rhs, gs, **args)


def test_transpose_rhs_shape_error():
  with pytest.raises(ValueError, match=r"transpose_rhs=True"):
    pk.gmm(_LHS, _RHS, _GS, transpose_rhs=True, backend="xla")


@pytest.mark.parametrize("kwargs, match", [
    (dict(rhs=jnp.ones((7, 3), jnp.float32)), r"rhs has shape \(7, 3\).*m=8"),
    (dict(num_actual_groups=3), r"num_actual_groups=3 must be an int in \[1, 2\]"),
    (dict(num_actual_groups=1, group_offset=2), r"group_offset=2"),
    (dict(lhs=jnp.ones((4, 8, 1), jnp.float32)), r"lhs must have rank 2"),
])
def test_tgmm_validation_errors(kwargs, match):
  args = dict(lhs=_LHS.T, rhs=jnp.ones((8, 3), jnp.float32))
  args.update(kwargs)
  lhs, rhs = args.pop("lhs"), args.pop("rhs")
  with pytest.raises(ValueError, match=match):
    pk.tgmm(lhs, rhs, _GS, backend="xla", **args)


def test_pallas_tiling_constraints():
  with pytest.raises(ValueError, match=r"powers of two >= 16"):
    pk.gmm(_LHS, _RHS, _GS, tiling=(24, 16, 16), backend="interpret_triton")


def test_traced_group_sizes_are_not_checked_eagerly():
  f = jax.jit(lambda gs: pk.gmm(_LHS, _RHS, gs, backend="cpu"))
  out = f(jnp.array([6, 5], jnp.int32))  # sum 11 > 8: clipped, no error.
  expected = np.concatenate([np.full((6, 3), 4.0), np.full((2, 3), 4.0)])
  np.testing.assert_allclose(out, expected)


def test_auto_backend_and_defaults():
  expected = {"cpu": "cpu", "gpu": "triton", "tpu": "mosaic_tpu"}
  assert pk.default_backend() == expected[jax.default_backend()]
  out = pk.gmm(_LHS, _RHS, _GS)
  assert out.shape == (8, 3) and out.dtype == jnp.float32
  out = pk.tgmm(_LHS.T, jnp.ones((8, 3), jnp.bfloat16), _GS)
  assert out.shape == (2, 4, 3) and out.dtype == jnp.float32  # lhs dtype.


def test_group_sizes_and_offset_get_no_gradient():
  def f(lhs, rhs, gs):
    return pk.gmm(lhs, rhs, gs, group_offset=0, backend="cpu").sum()
  grads = jax.grad(f, argnums=(0, 1, 2), allow_int=True)(_LHS, _RHS, _GS)
  assert grads[2].dtype == jax.dtypes.float0


def test_importable_without_moejax():
  code = ("import sys, pallas_kernels; "
          "assert not any(m.startswith('moejax') for m in sys.modules); "
          "print(pallas_kernels.BACKENDS)")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
