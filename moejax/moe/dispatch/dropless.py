"""Dropless dispatch: sort slots by expert, ragged grouped matmuls, scatter-add.

Every valid slot is computed (nothing dropped); cost follows the number of
valid slots. Invalid slots are sorted past the live rows, where `gmm` yields
zeros and does no work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pallas_kernels
from moejax.moe.experts import ExpertWeights, swiglu_grouped
from moejax.moe.types import Assignment


def sort_by_expert(assignment: Assignment, num_experts: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Slot order grouping valid slots by expert (invalid last) and group sizes."""
  key_A = jnp.where(assignment.valid, assignment.expert, num_experts)
  order_A = jnp.argsort(key_A, stable=True)
  group_sizes_E = jnp.sum(
      jax.nn.one_hot(key_A, num_experts, dtype=jnp.int32), axis=0)
  return order_A, group_sizes_E.astype(jnp.int32)


@jax.custom_vjp
def permute_rows(x_AxD: jax.Array, perm_A: jax.Array, inv_A: jax.Array) -> jax.Array:
  """x[perm] for a permutation `perm` with inverse `inv`.

  Its transpose is the gather x[inv], not the scatter-add autodiff would use
  for a general gather (much slower on CPU).
  """
  return x_AxD[perm_A]


def _permute_fwd(x_AxD, perm_A, inv_A):
  return x_AxD[perm_A], (perm_A, inv_A)


def _permute_bwd(res, g_AxD):
  perm_A, inv_A = res
  return g_AxD[inv_A], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def dropless_dispatch(x_TxD: jax.Array, assignment: Assignment,
                      w: ExpertWeights, *, dtype, cfg=None
                      ) -> tuple[jax.Array, dict]:
  e = w["w_gate"].shape[0]
  backend = cfg.get("gmm_backend", "auto") if cfg is not None else "auto"
  order_A, group_sizes_E = sort_by_expert(assignment, e)
  wt_A = jnp.where(assignment.valid, assignment.weight, 0.0)
  gmm = functools.partial(pallas_kernels.gmm, backend=backend)
  n = assignment.token_blocks
  if n:  # slot c*T + t holds token t: gathers and a reshape-sum, no scatter
    t, d = x_TxD.shape
    inv_A = jnp.zeros_like(order_A).at[order_A].set(
        jnp.arange(order_A.shape[0], dtype=order_A.dtype))
    x_AxD = permute_rows(jnp.tile(x_TxD, (n, 1)), order_A, inv_A)
    y_AxD = swiglu_grouped(w, x_AxD, group_sizes_E, dtype, gmm)
    y_AxD = permute_rows(y_AxD, inv_A, order_A) * wt_A[:, None]
    y_TxD = jnp.sum(y_AxD.reshape(n, t, d), axis=0)
  else:
    tok_A = assignment.token[order_A]
    y_AxD = swiglu_grouped(w, x_TxD[tok_A], group_sizes_E, dtype, gmm)
    y_TxD = jnp.zeros(x_TxD.shape, jnp.float32).at[tok_A].add(
        y_AxD * wt_A[order_A][:, None])
  return y_TxD, {"dropped_fraction": jnp.zeros((), jnp.float32)}
