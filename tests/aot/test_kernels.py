"""gmm, tgmm and grouped_swiglu forward + backward: compiled for a TPU (Mosaic), lowered for CUDA (Triton).

Each case is one `value_and_grad` program per op, built from abstract
arguments (group sizes traced, or concrete with empty groups baked in as
constants). On a TPU chip of v5e:1x1 the `mosaic_tpu` backend is compiled
by the TPU compiler (needs libtpu); for CUDA the `triton` backend is lowered
without a GPU (Triton compiles to PTX only on a GPU). Both must hold one
kernel custom call per grouped matmul: 3 for gmm and tgmm (forward, and the
gmm + tgmm of the backward), 9 for grouped_swiglu (3 products, 2 each back).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

import pallas_kernels as pk
from moejax.aot import topology
from moejax.aot.train_step import MOSAIC_CALL, TRITON_CALL
from tests.aot.conftest import needs_libtpu
from tests.pallas_kernels.kernel_cases import TILING

KERNELS = {"gmm": 3, "tgmm": 3, "grouped_swiglu": 9}  # custom calls, forward + backward


@dataclasses.dataclass(frozen=True)
class Case:
  m: int
  k: int  # gmm/tgmm contraction (tgmm: the output's k); grouped_swiglu: d
  n: int  # gmm/tgmm output width; grouped_swiglu: f
  groups: int
  dtype: str
  sizes: tuple[int, ...] | None = None  # None: traced; else concrete (empty groups)
  small_tiles: bool = False  # kernel_cases.TILING: many row tiles, straddled groups

  def group_sizes(self):
    return None if self.sizes is None else np.asarray(self.sizes, np.int32)


_SPARSE_64 = tuple(10 if g % 3 == 0 else 0 for g in range(64))  # 22 groups of 10, 42 empty
CASES = {
    "G1-f32": Case(128, 128, 128, 1, "float32"),
    "G8-bf16-empty": Case(256, 256, 384, 8, "bfloat16", (40, 0, 0, 100, 16, 0, 60, 0),
                          small_tiles=True),
    "G64-bf16-empty": Case(512, 128, 256, 64, "bfloat16", _SPARSE_64),
    "G64-f32-unaligned": Case(200, 96, 160, 64, "float32"),
}


def program(op: str, case: Case, backend: str):
  """(value_and_grad function, its abstract arguments) of one op's forward + backward."""
  dt = jnp.dtype(case.dtype)
  m, k, n, g = case.m, case.k, case.n, case.groups
  tiling = TILING[backend] if case.small_tiles else None
  shapes = {"gmm": [(m, k), (g, k, n)], "tgmm": [(k, m), (m, n)],
            "grouped_swiglu": [(m, k), (g, k, n), (g, k, n), (g, n, k), (m,)]}[op]
  args = [jax.ShapeDtypeStruct(s, dt) for s in shapes]
  if case.sizes is None:
    args.append(jax.ShapeDtypeStruct((g,), jnp.int32))
  fixed = case.group_sizes()

  def loss(*a):
    *arrays, sizes = a if fixed is None else (*a, fixed)
    if op == "gmm":
      out = pk.gmm(*arrays, sizes, tiling=tiling, backend=backend)
    elif op == "tgmm":
      out = pk.tgmm(*arrays, sizes, tiling=tiling, backend=backend)
    else:
      x, wg, wu, wd, scale = arrays
      out = pk.grouped_swiglu(x, wg, wu, wd, sizes, scale=scale, tiling=tiling,
                              backend=backend)
    return jnp.sum(out.astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, tuple(range(len(shapes))))), args


def custom_calls(hlo_text: str, target: str) -> int:
  return len(re.findall(rf'custom_call_target="{re.escape(target)}"', hlo_text))


@pytest.fixture(scope="module")
def tpu_chip():
  return topology.tpu_devices("v5e:1x1")[0]


@needs_libtpu
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("op", KERNELS)
def test_mosaic_kernels_compile_for_tpu(op, case, tpu_chip):
  fn, args = program(op, CASES[case], "mosaic_tpu")
  on_chip = SingleDeviceSharding(tpu_chip)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip) for a in args]
  compiled = fn.lower(*args).compile()
  assert custom_calls(compiled.as_text(), MOSAIC_CALL) == KERNELS[op]
  loss, grads = compiled.out_info
  assert loss.shape == () and loss.dtype == jnp.float32
  assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args[:len(grads)]]
  assert compiled.memory_analysis().argument_size_in_bytes >= sum(
      a.size * a.dtype.itemsize for a in args)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("op", KERNELS)
def test_triton_kernels_lower_for_cuda(op, case):
  fn, args = program(op, CASES[case], "triton")
  traced = fn.trace(*args)
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert text.count(f"stablehlo.custom_call @{TRITON_CALL}(") == KERNELS[op]
  loss, grads = traced.out_info
  assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args[:len(grads)]]
