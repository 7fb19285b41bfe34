"""What every router returns."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax.layers import fan_in_init

from moejax.moe.types import Assignment, SoftAssignment


@flax.struct.dataclass
class RouterOutput:
  """A routing decision plus what balancing losses and metrics need.

  `logits_TxE` / `probs_TxE` are float32 over the router's choices (for
  routers with null experts, E counts them too); a router without learned
  scores (hash) leaves them None and the layer reports no balance/z-loss.
  `balance_counts_E` are the per-choice counts the balancing loss uses when
  they differ from the assignment's valid slots (null experts count there).
  `losses` holds unweighted router-specific auxiliary losses; the generic ones
  (switch balance, z-loss) are formed by the MoE layer. `metrics` are scalars
  (or [E] vectors) added to the layer's metric schema.
  """

  assignment: Assignment | SoftAssignment
  logits_TxE: jax.Array | None
  probs_TxE: jax.Array | None
  losses: dict = flax.struct.field(default_factory=dict)
  metrics: dict = flax.struct.field(default_factory=dict)
  balance_counts_E: jax.Array | None = None
  state_stats: dict = flax.struct.field(default_factory=dict)
  carry: Any = None


# Optional hooks a router class may define (see DESIGN section 2):
#   uses_carry = True; init_carry(num_tokens, cfg) -> pytree;
#   make_shared(module, d, cfg) -> dict   (params shared by all layers,
#       created in the model's scope);    __call__(..., carry=, shared=)
#       then returns RouterOutput(carry=new carry).
#   update_state(state: dict, stats: dict, cfg) -> dict   (pure; updates the
#       router's "moe_state" variables after each optimizer step from the
#       `state_stats` of the step, summed over the whole global batch).
#   choice_major_slots = False   (slot c * T + t is not token t's c-th choice:
#       the expert-parallel dispatch is not used; default True)


class Router(nn.Module):
  """Base of the router modules: holds the `moe` config.

  `param_count(cfg, d_model)` is the number of router parameters per MoE
  layer; the default is one linear gate [D, E]. Routers with other
  parameters override it.
  """

  cfg: Any  # ml_collections.FrozenConfigDict: the `moe` config

  @staticmethod
  def param_count(cfg, d_model: int) -> int:
    return d_model * cfg.num_experts


def gate_logits(module: nn.Module, x_TxD: jax.Array, num_choices: int) -> jax.Array:
  """float32 router logits x @ w_gate, creating `module`'s w_gate [D, num_choices].

  Router logits are computed in float32 whatever the activation dtype.
  """
  d = x_TxD.shape[-1]
  w_DxC = module.param("w_gate", fan_in_init(d), (d, num_choices))
  return jnp.dot(x_TxD.astype(jnp.float32), w_DxC, precision="highest")
