"""Ragged grouped matmuls (gmm / tgmm) for Mixture-of-Experts, several backends.

`gmm(lhs [m,k], rhs [G,k,n], group_sizes [G]) -> [m,n]` and
`tgmm(lhs [k,m], rhs [m,n], group_sizes) -> [G,k,n]` with the conventions of
JAX's megablox kernels. `backend="auto"` picks `default_backend()`:
mosaic_tpu on TPU, triton on GPU, cpu on CPU. Importable without moejax.
"""

from pallas_kernels.api import BACKENDS, default_backend, gmm, tgmm

__all__ = ["BACKENDS", "default_backend", "gmm", "tgmm"]
