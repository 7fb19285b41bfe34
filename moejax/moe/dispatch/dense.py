"""Dense dispatch: every expert on every token, weighted. The reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.experts import ExpertWeights
from moejax.moe.types import Assignment


def dense_dispatch(x_TxD: jax.Array, assignment: Assignment, experts: ExpertWeights,
                   *, cfg=None) -> tuple[jax.Array, dict]:
  """y_t = sum_e c[t, e] * FFN_e(x_t) with c the assignment's combine matrix.

  Costs E times a token's active FLOPs; exact for any assignment (a token
  picked twice by the same expert gets the summed weight).
  """
  del cfg
  t = x_TxD.shape[0]
  e = experts.num_experts
  c_TxE = assignment.combine_matrix(t, e)
  y_ExTxD = experts.batched(jnp.broadcast_to(x_TxD, (e,) + x_TxD.shape))
  y_TxD = jnp.einsum("te,etd->td", c_TxE, y_ExTxD,
                     precision=jax.lax.Precision.HIGHEST)
  return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32)}
