"""Entropy of the router distribution as an auxiliary loss of the MoE layer (any router
with probabilities).

The Tsallis entropy of a token's router probabilities p over its C choices,

    S_q(p) = (1 - sum_i p_i^q) / (q - 1),   q > 0,

tends to the Shannon entropy -sum_i p_i log p_i as q -> 1; q > 1 weighs the
large probabilities more, q < 1 the small ones. DynMoLE (Li et al. 2025,
"DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing
Mechanism") adds the Tsallis entropy of the router distribution as an
auxiliary loss that reduces the router's uncertainty.

Config `moe.router_entropy`:
  kind: "none" (off), "shannon" (the mean Shannon entropy, the function of
      the router_entropy metric and of top_p's entropy_loss: one function)
      or "tsallis" (S_q, with q = 1 computed as Shannon).
  q: the entropic index, > 0 (only read by "tsallis").
  weight: the loss's weight, any finite number. The loss is the mean over
      tokens of the entropy, so a positive weight minimises it and
      sharpens the router (each token concentrates on fewer experts), a
      negative weight maximises it and spreads the probabilities. DynMoLE
      minimises it; the default weight is positive.
The MoE layer reports it unweighted as "router_entropy_loss" (the one
auxiliary-loss channel, moejax/aux_losses.py), computed on the router's
`probs_TxE` (for null experts over E + num_null choices, for Soft MoE the
tokens' combine mass). A router without probabilities (hash, thor) is
refused by config key.

S_q is evaluated as sum_i p_i * (-expm1((q - 1) log p_i)) / (q - 1), equal to
the definition whenever the p_i sum to 1 and free of its cancellation near
q = 1; p_i = 0 contributes 0 with a zero gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import choice, fail
from moejax.moe.metrics import mean_entropy

KINDS = ("none", "shannon", "tsallis")
LOSS = "router_entropy_loss"


def tsallis_entropy(probs_TxC: jax.Array, q: float) -> jax.Array:
  """[T] Tsallis entropy S_q of each token's distribution, float32; q != 1 (its limit q = 1
  is the Shannon entropy, `moejax.moe.metrics.mean_entropy`)."""
  if q == 1.0:
    raise ValueError("tsallis_entropy: q = 1 is the Shannon entropy (mean_entropy)")
  p = probs_TxC.astype(jnp.float32)
  live = p > 0
  log_p = jnp.log(jnp.where(live, p, 1.0))
  term = -jnp.expm1((q - 1.0) * log_p) / (q - 1.0)
  return jnp.sum(jnp.where(live, p * term, 0.0), axis=-1)


def entropy_loss(probs_TxC: jax.Array, kind: str, q: float) -> jax.Array:
  """The mean over tokens of the entropy `kind` selects (unweighted)."""
  if kind == "shannon" or (kind == "tsallis" and q == 1.0):
    return mean_entropy(probs_TxC)
  if kind == "tsallis":
    return jnp.mean(tsallis_entropy(probs_TxC, q))
  raise ValueError(f"moe.router_entropy.kind={kind!r} reports no loss; allowed: {KINDS}")


def enabled(cfg_moe) -> bool:
  opts = cfg_moe.get("router_entropy")
  return opts is not None and opts.kind != "none"


def aux_losses(cfg_moe) -> tuple[AuxLoss, ...]:
  """The loss every MoE layer reports when moe.router_entropy.kind is not "none"."""
  return (AuxLoss(LOSS, "moe.router_entropy.weight"),) if enabled(cfg_moe) else ()


def layer_losses(cfg_moe, probs_TxC: jax.Array | None) -> dict[str, jax.Array]:
  """{"router_entropy_loss": ...} when enabled, else {} (the MoE layer's call)."""
  if not enabled(cfg_moe):
    return {}
  if probs_TxC is None:
    raise ValueError(f"moe.router_entropy.kind={cfg_moe.router_entropy.kind!r} needs router "
                     f"probabilities; moe.router={cfg_moe.router!r} returns none")
  opts = cfg_moe.router_entropy
  return {LOSS: entropy_loss(probs_TxC, opts.kind, float(opts.q))}


def check_config(cfg, returns_probs: bool) -> None:
  """moe.router_entropy.*; `returns_probs`: whether the chosen router has probabilities."""
  opts = cfg.moe.router_entropy
  choice(opts.kind, "moe.router_entropy.kind", KINDS)
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  if not number(opts.q) or not math.isfinite(opts.q) or opts.q <= 0:
    fail("moe.router_entropy.q", opts.q, "must be a finite number > 0 (q -> 1: Shannon)")
  if not number(opts.weight) or not math.isfinite(opts.weight):
    fail("moe.router_entropy.weight", opts.weight, "must be a finite number (> 0 minimises "
         "the entropy, < 0 maximises it)")
  if opts.kind != "none" and not returns_probs:
    fail("moe.router_entropy.kind", opts.kind, f"needs a router with probabilities; "
         f"moe.router={cfg.moe.router!r} returns none (allowed with it: 'none')")
