"""Capacity dispatch (GShard): fixed per-expert buffers, one-hot einsums.

Each expert takes at most C = ceil(capacity_factor * A / E) of the A valid
assignment slots, first come first served in slot order (routers order their
slots by priority, e.g. all first choices before second choices); the rest
are dropped: they contribute nothing and are counted.

Dropping couples tokens across the batch: with top-k slots in choice-major
order, a token's second choice can be dropped because of later tokens' first
choices, so in a decoder `capacity` is causal only when nothing is dropped.
Use `dropless` (the default) for exact causal language modelling.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.moe.experts import ExpertWeights
from moejax.moe.types import Assignment


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
  """Per-expert buffer size C = ceil(capacity_factor * A / E), at least 1."""
  return max(1, math.ceil(capacity_factor * num_slots / num_experts))


def capacity_positions(assignment: Assignment, num_experts: int,
                       capacity: int) -> tuple[jax.Array, jax.Array]:
  """Buffer position of each slot in its expert and whether it is kept.

  Returns (pos_A int32, keep_A bool): for a valid slot, pos is the number of
  earlier valid slots that chose the same expert (invalid slots get 0 and are
  never kept); a slot is kept iff valid and pos < capacity.
  """
  onehot_AxE = (jax.nn.one_hot(assignment.expert, num_experts, dtype=jnp.int32)
                * assignment.valid[:, None])
  pos_A = jnp.sum((jnp.cumsum(onehot_AxE, axis=0) - 1) * onehot_AxE, axis=1)
  keep_A = assignment.valid & (pos_A < capacity)
  return pos_A.astype(jnp.int32), keep_A


def capacity_dispatch(x_TxD: jax.Array, assignment: Assignment,
                      experts: ExpertWeights, *, cfg) -> tuple[jax.Array, dict]:
  t = x_TxD.shape[0]
  e, dtype = experts.num_experts, experts.dtype
  c = expert_capacity(assignment.num_slots, e, cfg.capacity_factor)
  pos_A, keep_A = capacity_positions(assignment, e, c)
  # [T, E, C] dispatch mask and combine weights (a token's slots summed);
  # dropped slots land in an extra buffer row c that is sliced off.
  pos_A = jnp.where(keep_A, pos_A, c)
  idx = (assignment.token, assignment.expert, pos_A)
  dispatch_TxExC = jnp.zeros((t, e, c + 1), jnp.float32).at[idx].add(1.0)[..., :c]
  w_A = jnp.where(keep_A, assignment.weight, 0.0).astype(jnp.float32)
  combine_TxExC = jnp.zeros((t, e, c + 1), jnp.float32).at[idx].add(w_A)[..., :c]
  x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC.astype(dtype),
                       x_TxD.astype(dtype), preferred_element_type=jnp.float32)
  y_ExCxD = experts.batched(x_ExCxD)
  y_TxD = jnp.einsum("tec,ecd->td", combine_TxExC, y_ExCxD,
                     precision=jax.lax.Precision.HIGHEST)
  num_valid = jnp.maximum(jnp.sum(assignment.valid), 1)
  dropped = jnp.sum(assignment.valid & ~keep_A) / num_valid
  return y_TxD, {"dropped_fraction": dropped.astype(jnp.float32)}
