"""moejax: Mixture-of-Experts language models in JAX/Flax (see docs/architecture.md)."""

# Sets the process's malloc parameters the CPU grouped matmul needs (large
# results reused from a huge-page heap; pallas_kernels/cpu_env.py). It must
# run before JAX's first computation, so importing moejax first is enough;
# it loads no JAX.
import pallas_kernels as _pallas_kernels  # noqa: F401

__version__ = "0.1.0"
