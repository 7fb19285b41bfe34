"""Soft dispatch: mix tokens into slots, run the experts on slots, mix back.

Applies a `SoftAssignment` (Soft MoE / Mixture of Tokens): per group g,
x_slot[g, s] = sum_m dispatch[g, m, s] * x[token[g, m]]; slot s goes to
expert s // slots_per_expert, all experts batched (`ExpertWeights.batched`) over
their G * slots_per_expert slots; y[token[g, m]] += sum_s combine[g, m, s] *
y_slot[g, s]. Nothing is dropped. The MoE layer uses it for every
SoftAssignment regardless of `moe.dispatch` (the sparse dispatchers take an
`Assignment`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.experts import ExpertWeights
from moejax.moe.types import SoftAssignment


def soft_dispatch(x_TxD: jax.Array, assignment: SoftAssignment, experts: ExpertWeights,
                  *, cfg=None) -> tuple[jax.Array, dict]:
  del cfg
  e, dtype = experts.num_experts, experts.dtype
  g, m, s = assignment.dispatch.shape
  spe = s // e
  d = x_TxD.shape[-1]
  x_GxMxD = x_TxD[assignment.token]
  x_GxSxD = jnp.einsum("gms,gmd->gsd", assignment.dispatch.astype(dtype),
                       x_GxMxD.astype(dtype), preferred_element_type=jnp.float32)
  # Slot s = expert * spe + j: expert e's buffer holds its slots of every group.
  x_ExCxD = x_GxSxD.reshape(g, e, spe, d).transpose(1, 0, 2, 3).reshape(e, g * spe, d)
  y_ExCxD = experts.batched(x_ExCxD)
  y_GxSxD = y_ExCxD.reshape(e, g, spe, d).transpose(1, 0, 2, 3).reshape(g, s, d)
  y_GxMxD = jnp.einsum("gms,gsd->gmd", assignment.combine, y_GxSxD,
                       precision=jax.lax.Precision.HIGHEST)
  y_TxD = jnp.zeros(x_TxD.shape, jnp.float32).at[assignment.token.reshape(-1)].add(
      y_GxMxD.reshape(g * m, d))
  return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32)}
