"""The auxiliary-loss channel: every auxiliary loss is declared once, weighted and summed here.

Components report their losses unweighted, by name, in the model's
`aux["losses"]` (one array per loss: its values at each layer that reports
it, in layer order). Each component also declares what it reports as
`AuxLoss(name, weight)`, `weight` being the dotted config key whose value
multiplies the loss (None: weight 1, for a loss that carries its own
adaptive scale, e.g. ReMoE's L1 coefficient). The model
(`moejax.model.transformer.aux_losses`) collects the declarations of the MoE
layer (balancing losses, z-loss, the router's own), the attention experts
and the adapter experts; `total` is the one place where losses are weighted
and summed, and it refuses a reported loss nobody declared (nothing is
silently dropped).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import lookup


@dataclasses.dataclass(frozen=True)
class AuxLoss:
  """An auxiliary loss: its name in aux["losses"] and the config key of its weight."""

  name: str
  weight: str | None  # dotted config key, or None for weight 1
  per_moe_layer: bool = True  # reported by the MoE layers (else by every layer)

  def weight_value(self, cfg: ml_collections.ConfigDict) -> float:
    return 1.0 if self.weight is None else float(lookup(cfg, self.weight))


def total(losses: dict[str, jax.Array], specs: dict[str, AuxLoss],
          cfg: ml_collections.ConfigDict,
          scheduled: dict[str, jax.Array] | None = None) -> jax.Array:
  """sum over losses of weight * sum over layers (float32); a weight key in `scheduled`
  (the step's `moejax.schedules.values`) takes its scheduled value instead."""
  unknown = sorted(set(losses) - set(specs))
  if unknown:
    raise ValueError(f"auxiliary losses {unknown} are reported but not declared; "
                     f"declared: {sorted(specs)}")
  out = jnp.zeros((), jnp.float32)
  for name, v in losses.items():
    w = (scheduled or {}).get(specs[name].weight)  # traced: always added
    if w is None:
      w = specs[name].weight_value(cfg)
      if not w:
        continue
    out = out + w * jnp.sum(v.astype(jnp.float32))
  return out
