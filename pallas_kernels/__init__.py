"""Ragged grouped matmuls (gmm / tgmm) for Mixture-of-Experts, several backends.

`gmm(lhs [m,k], rhs [G,k,n], group_sizes [G]) -> [m,n]` and
`tgmm(lhs [k,m], rhs [m,n], group_sizes) -> [G,k,n]` with the conventions of
JAX's megablox kernels, and `grouped_swiglu` (a SwiGLU expert layer on those
groups; fused on CPU). `backend="auto"` picks `default_backend()`:
mosaic_tpu on TPU, triton on GPU, cpu on CPU. Importable without moejax.

Importing this package (or moejax, which imports it) sets glibc malloc's
parameters for the process (`pallas_kernels.cpu_env`: large results reused
from a heap on transparent huge pages instead of fresh 4 KiB pages each
step, which is what the CPU kernels' documented speed needs);
`MOEJAX_HUGEPAGES=0` turns it off, `MOEJAX_HUGEPAGE_HEAP` sizes the
huge-page heap. It must happen before JAX's first computation. The API is
loaded on first use, so the import itself loads no JAX.
"""

from __future__ import annotations

from pallas_kernels import cpu_env as _cpu_env

_cpu_env.configure_malloc()

__all__ = ["BACKENDS", "default_backend", "gmm", "grouped_swiglu", "tgmm"]


def __getattr__(name: str):
  if name == "grouped_swiglu":
    from pallas_kernels import swiglu  # noqa: PLC0415
    return swiglu.grouped_swiglu
  if name in __all__:
    from pallas_kernels import api  # noqa: PLC0415
    return getattr(api, name)
  raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
