"""What every router returns."""

from __future__ import annotations

import flax.struct
import jax

from moejax.moe.types import Assignment, SoftAssignment


@flax.struct.dataclass
class RouterOutput:
  """A routing decision plus what balancing losses and metrics need.

  `logits_TxE` / `probs_TxE` are float32 over the router's choices (for
  routers with null experts, E counts them too). `losses` holds unweighted
  router-specific auxiliary losses; the generic ones (switch balance, z-loss)
  are formed by the MoE layer from the logits, probabilities and assignment.
  """

  assignment: Assignment | SoftAssignment
  logits_TxE: jax.Array
  probs_TxE: jax.Array
  losses: dict = flax.struct.field(default_factory=dict)
  metrics: dict = flax.struct.field(default_factory=dict)
