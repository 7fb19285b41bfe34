"""The router contract: what every router declares and returns.

A router is a Flax module (parameters) around a pure routing function in the
same file. Its `__call__(x_TxD, *, shape_BxL, token_ids, deterministic,
carry, shared)` returns a `RouterOutput`; everything else about it is
declared on the class, with defaults here, so no caller probes for hooks:

properties
  choice_major_slots   slot c * T + t is token t's c-th choice (the
                       expert-parallel dispatch needs it)
  uses_carry           passes state from one MoE layer to the next (the
                       scan carry; `init_carry`, `make_shared`)
  adaptive             the number of experts per token varies
  zero_computation(cfg_moe)  the zero-computation choices (zero, copy,
                       constant experts) it scores after the E experts, or
                       None; the layer applies them (moejax/moe/zero_experts.py)
  pool_stats_over_layers  `update_state` gets stats summed over MoE layers
  returns_probs        `probs_TxE` is not None (the balancing losses, the
                       router-entropy loss and the entropy metrics need it)
  is_causal(cfg)       a decoder's position t never sees later tokens
  decode_refusal(cfg)  None if it routes one token at a time exactly as in
                       training (so it can decode with a KV cache); else
                       the reason it cannot
training
  consistency(cfg_moe) None, or a `Consistency`: the trainer runs two
                       forward passes of each batch under independent
                       "router" rngs, takes the mean of their losses and
                       adds its weight key's value times `symmetric_kl` of
                       the two passes' next-token distributions (THOR)
  schedules(cfg_moe)   {dotted config key: moejax.schedules.Schedule} of the
                       values it reads per training step (a k ramp, a
                       temperature), through `scheduled(shared, key)`
  expert_embedding(cfg_moe)  None, or params -> [E, D]: each expert's
                       embedding in the token space, read from the router's
                       params (the ERC loss's proxy tokens, moejax/moe/erc.py)
declared outputs
  metrics(cfg_moe)     `Metric`s it adds to the layer's metrics
  aux_losses(cfg_moe)  `AuxLoss`es it reports (unweighted; the weight is a
                       config key, applied in moejax/aux_losses.py)
state
  state_names(cfg_moe) its non-trained "moe_state" variables
  update_state(state, stats, cfg_moe)  pure update of its "moe_state" after
                       each optimizer step, from `state_stats` summed over
                       the global batch (moejax/moe/state.py)
counting and config
  param_count, shared_param_count, experts_per_token (training),
  inference_experts_per_token (deterministic=True), check_config
The layer checks at trace time that a router returns exactly the metrics and
losses it declares.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import lookup
from moejax.layers import fan_in_init
from moejax.moe.metrics import Metric
from moejax.moe.types import Assignment, SoftAssignment
from moejax.moe.zero_experts import ZeroComputation
from moejax.schedules import Schedule


@flax.struct.dataclass
class RouterOutput:
  """A routing decision plus what balancing losses and metrics need.

  `logits_TxE` / `probs_TxE` are float32 over the router's choices (for
  routers with null experts, E counts them too); a router without learned
  scores (hash) leaves them None and the layer reports no balance/z-loss.
  `balance_counts_E` are the per-choice counts the balancing loss uses when
  they differ from the assignment's valid slots (null experts count there).
  `losses` holds the router's own auxiliary losses, unweighted, exactly those
  of `aux_losses(cfg_moe)`; the generic ones (balance, z-loss) are formed by
  the MoE layer. `metrics` are exactly those of `metrics(cfg_moe)`: scalars, or [E]
  vectors for per-expert ones. `state_stats` feed `update_state`; `carry` is
  the new carry of a `uses_carry` router. `zero_weights_TxZ` [T, Z] float32
  is each token's combine weight of every zero-computation choice (0 where
  not picked), from exactly the routers that declare `zero_computation`.
  """

  assignment: Assignment | SoftAssignment
  logits_TxE: jax.Array | None
  probs_TxE: jax.Array | None
  losses: dict = flax.struct.field(default_factory=dict)
  metrics: dict = flax.struct.field(default_factory=dict)
  balance_counts_E: jax.Array | None = None
  state_stats: dict = flax.struct.field(default_factory=dict)
  carry: Any = None
  zero_weights_TxZ: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Consistency:
  """A router's training-time behaviour: two forward passes and a consistency loss.

  The trainer runs each (micro-)batch through the model twice, with
  independent "router" rngs (so a stochastic router routes the passes
  independently); the language-model loss is the mean of the two passes'
  losses (cross-entropy, or the distillation loss) plus the value of config
  key `weight` times `symmetric_kl` between the passes' next-token
  distributions. Auxiliary losses and metrics are the passes' means.
  """

  weight: str  # dotted config key of the symmetric KL's weight

  def weight_value(self, cfg) -> float:
    return float(lookup(cfg, self.weight))


def symmetric_kl(logits_a_BxLxV: jax.Array, logits_b_BxLxV: jax.Array,
                 weights_BxL: jax.Array | None = None) -> jax.Array:
  """(KL(p_a || p_b) + KL(p_b || p_a)) / 2 per token, mean over tokens (weighted mean with
  weights), float32 nats; p = softmax(logits)."""
  log_a = jax.nn.log_softmax(logits_a_BxLxV.astype(jnp.float32), axis=-1)
  log_b = jax.nn.log_softmax(logits_b_BxLxV.astype(jnp.float32), axis=-1)
  sym_BxL = 0.5 * jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)
  if weights_BxL is None:
    return jnp.mean(sym_BxL)
  return jnp.sum(sym_BxL * weights_BxL) / jnp.sum(weights_BxL)


class Router(nn.Module):
  """Base of the router modules: holds the `moe` config and the contract's defaults."""

  cfg: Any  # ml_collections.FrozenConfigDict: the `moe` config

  choice_major_slots: ClassVar[bool] = True
  uses_carry: ClassVar[bool] = False
  adaptive: ClassVar[bool] = False
  pool_stats_over_layers: ClassVar[bool] = False
  returns_probs: ClassVar[bool] = True

  @classmethod
  def consistency(cls, cfg_moe) -> Consistency | None:
    """The two-pass consistency training it needs (the `moe` config), or None."""
    del cfg_moe
    return None

  @classmethod
  def schedules(cls, cfg_moe) -> dict[str, Schedule]:
    """{config key: Schedule} of the values it reads each training step (the `moe` config)."""
    del cfg_moe
    return {}

  @classmethod
  def expert_embedding(cls, cfg_moe) -> Callable[[dict], jax.Array] | None:
    """params -> [E, D] float32 per-expert embeddings in the token space, or None.

    Default: the columns of the linear gate `w_gate` [D, >= E] (`gate_logits`;
    the first E, so null experts' extra columns are left out). Routers
    without a linear gate over the experts return None.
    """
    e = cfg_moe.num_experts
    return lambda params: params["w_gate"][:, :e].T.astype(jnp.float32)

  @classmethod
  def is_causal(cls, cfg) -> bool:
    """Whether a decoder's outputs at t are independent of later tokens (full config)."""
    del cfg
    return True

  @classmethod
  def decode_refusal(cls, cfg) -> str | None:
    """None if one token at a time is routed as in training; else why not (full config)."""
    del cfg
    return None

  @classmethod
  def zero_computation(cls, cfg_moe) -> ZeroComputation | None:
    """Its zero-computation choices after the E experts (the `moe` config), or None."""
    del cfg_moe
    return None

  @classmethod
  def metrics(cls, cfg_moe) -> tuple[Metric, ...]:
    """The metrics the router adds (the `moe` config)."""
    del cfg_moe
    return ()

  @classmethod
  def aux_losses(cls, cfg_moe) -> tuple[AuxLoss, ...]:
    """The auxiliary losses the router reports (the `moe` config)."""
    del cfg_moe
    return ()

  @classmethod
  def check_config(cls, cfg, chosen: bool) -> None:
    """Raises ConfigError for bad `moe.<router>.*` values; cross-key rules when `chosen`."""
    del cfg, chosen

  @classmethod
  def param_count(cls, cfg_moe, d_model: int) -> int:
    """Router parameters per MoE layer (default: one linear gate [D, E])."""
    return d_model * cfg_moe.num_experts

  @classmethod
  def shared_param_count(cls, cfg_moe, d_model: int) -> int:
    """Router parameters shared by all MoE layers (`make_shared`)."""
    del cfg_moe, d_model
    return 0

  @classmethod
  def experts_per_token(cls, cfg) -> float:
    """Expert applications per token in training (full config): top_k unless the router
    says otherwise."""
    return cfg.moe.top_k

  @classmethod
  def inference_experts_per_token(cls, cfg) -> float:
    """Expert applications per token with deterministic=True (full config): as in training
    unless the router routes differently there (THOR)."""
    return cls.experts_per_token(cfg)

  @classmethod
  def init_carry(cls, num_tokens: int, cfg_moe) -> Any:
    """The carry before the first MoE layer (`uses_carry` routers)."""
    del num_tokens, cfg_moe
    return None

  @classmethod
  def make_shared(cls, module: nn.Module, d: int, cfg_moe) -> dict:
    """Parameters shared by all MoE layers, created in `module`'s (the model's) scope."""
    del module, d, cfg_moe
    return {}

  @classmethod
  def state_names(cls, cfg_moe) -> tuple[str, ...]:
    """Its variables in the non-trained "moe_state" collection (the `moe` config)."""
    del cfg_moe
    return ()

  @classmethod
  def update_state(cls, state: dict, stats: dict, cfg_moe) -> dict:
    """One layer's new "moe_state" from the step's global-batch `state_stats`."""
    del stats, cfg_moe
    return state


def gate_logits(module: nn.Module, x_TxD: jax.Array, num_choices: int) -> jax.Array:
  """float32 router logits x @ w_gate, creating `module`'s w_gate [D, num_choices].

  Router logits are computed in float32 whatever the activation dtype.
  """
  d = x_TxD.shape[-1]
  w_DxC = module.param("w_gate", fan_in_init(d), (d, num_choices))
  return jnp.dot(x_TxD.astype(jnp.float32), w_DxC, precision="highest")
