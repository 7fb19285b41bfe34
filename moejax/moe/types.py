"""The two data types where routers meet dispatchers (docs/architecture.md)."""

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

  @classmethod
  def from_choices(cls, e_TxK: jax.Array, w_TxK: jax.Array,
                   valid_TxK: jax.Array | None = None) -> "Assignment":
    """Choice-major slots from per-token choices: slot c * T + t is token t's c-th choice
    (what `Router.choice_major_slots` declares); `valid_TxK` None: every slot is live."""
    t, k = e_TxK.shape
    choice_major = lambda a: a.T.reshape(-1)  # noqa: E731
    return cls(token=jnp.tile(jnp.arange(t, dtype=jnp.int32), k),
               expert=choice_major(e_TxK.astype(jnp.int32)),
               weight=choice_major(w_TxK),
               valid=(jnp.ones((t * k,), bool) if valid_TxK is None
                      else choice_major(valid_TxK)))

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
  """Soft MoE / Mixture of Tokens: dense mixing within G groups of M tokens.

  Group g holds the flat tokens `token[g, :]` (each token in exactly one
  group); its S = E * slots_per_expert slots each take a convex combination
  of the group's tokens, x_slot[g, s] = sum_m dispatch[g, m, s] * x[token[g, m]],
  slot s is processed by expert s // slots_per_expert, and token token[g, m]
  receives sum_s combine[g, m, s] * y_slot[g, s]. dispatch sums to 1 over m
  (per slot), combine sums to 1 over s (per token). Grouping is what keeps a
  decoder causal: the soft router groups the tokens at one sequence position
  across the batch, never tokens along the sequence.
  """

  token: jax.Array  # [G, M] int32, in [0, T)
  dispatch: jax.Array  # [G, M, S] float32
  combine: jax.Array  # [G, M, S] float32

  @property
  def num_slots(self) -> int:
    """S, the number of slots per group (all experts)."""
    return self.dispatch.shape[-1]
