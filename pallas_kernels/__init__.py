"""Ragged grouped matmuls (gmm / tgmm) for Mixture-of-Experts, several backends.

`gmm(lhs [m,k], rhs [G,k,n], group_sizes [G]) -> [m,n]` and
`tgmm(lhs [k,m], rhs [m,n], group_sizes) -> [G,k,n]` with the conventions of
JAX's megablox kernels, and `grouped_swiglu` (a SwiGLU expert layer on those
groups; fused on CPU). `backend="auto"` picks `default_backend()`:
mosaic_tpu on TPU, triton on GPU, cpu on CPU. Importable without moejax.

The API is loaded on first use, so `pallas_kernels.cpu_env` (process setup
that entry points run before JAX starts) imports without JAX.
"""

from __future__ import annotations

__all__ = ["BACKENDS", "default_backend", "gmm", "grouped_swiglu", "tgmm"]


def __getattr__(name: str):
  if name == "grouped_swiglu":
    from pallas_kernels import swiglu  # noqa: PLC0415
    return swiglu.grouped_swiglu
  if name in __all__:
    from pallas_kernels import api  # noqa: PLC0415
    return getattr(api, name)
  raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
