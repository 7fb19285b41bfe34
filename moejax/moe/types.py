"""The two data types where routers meet dispatchers (DESIGN section 2)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Assignment:
  """A sparse routing decision over A static-length assignment slots.

  Slot a sends token `token[a]` to expert `expert[a]` with combine weight
  `weight[a]`; `valid[a]` is False for slots that carry nothing (dropped,
  null-expert or unused adaptive slots). Invalid slots may hold any token and
  expert index in range; dispatchers must give them zero weight and no FLOPs
  where they can.
  """

  token: jax.Array  # [A] int32, in [0, T)
  expert: jax.Array  # [A] int32, in [0, E)
  weight: jax.Array  # [A] float32
  valid: jax.Array  # [A] bool

  @property
  def num_slots(self) -> int:
    return self.token.shape[0]

  def expert_counts(self, num_experts: int) -> jax.Array:
    """[E] float32 number of valid slots per expert."""
    onehot_AxE = jax.nn.one_hot(self.expert, num_experts, dtype=jnp.float32)
    return jnp.sum(onehot_AxE * self.valid[:, None], axis=0)

  def combine_matrix(self, num_tokens: int, num_experts: int) -> jax.Array:
    """[T, E] float32 total weight with which each token uses each expert."""
    w_A = jnp.where(self.valid, self.weight, 0.0).astype(jnp.float32)
    return jnp.zeros((num_tokens, num_experts), jnp.float32).at[
        self.token, self.expert].add(w_A)


@flax.struct.dataclass
class SoftAssignment:
  """Soft MoE / Mixture of Tokens: dense mixing over S = E * slots slots.

  Slot s receives sum_t dispatch[t, s] * x[t]; token t receives
  sum_s combine[t, s] * y[s]. Slot s belongs to expert s // slots_per_expert.
  """

  dispatch: jax.Array  # [T, S] float32
  combine: jax.Array  # [T, S] float32
