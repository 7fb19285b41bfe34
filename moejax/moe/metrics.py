"""Per-MoE-layer routing metrics (float32): the layer's own and the routers' declared ones.

Every MoE layer reports `LAYER_METRICS`; a router adds the metrics it
declares (`Router.metrics(cfg)`), so the schema of a run is known from its
config and a router's metrics reach TensorBoard, metrics.jsonl and (with
`summary=True`) summary.json without any list to edit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

REDUCTIONS = ("mean", "sum", "max")


@dataclasses.dataclass(frozen=True)
class Metric:
  """A metric one MoE layer reports.

  reduce: how values combine across gradient-accumulation micro-batches and,
      in summary.json, across layers ("mean", "sum" or "max").
  per_expert: an [E] vector (logged as .../e{j}) instead of a scalar.
  summary: summary.json reports `moe_<name>`, reduced over layers.
  """

  name: str
  reduce: str = "mean"
  per_expert: bool = False
  summary: bool = False

  def __post_init__(self):
    if self.reduce not in REDUCTIONS:
      raise ValueError(f"Metric {self.name!r}: reduce={self.reduce!r}; allowed: {REDUCTIONS}")

  def apply(self, x: jax.Array, axis: int = 0) -> jax.Array:
    return {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}[self.reduce](x, axis=axis)


LAYER_METRICS = (
    Metric("load", per_expert=True),
    Metric("load_max_over_mean", summary=True),
    Metric("load_cv", summary=True),
    Metric("router_entropy"),
    Metric("top1_prob"),
    Metric("experts_per_token", summary=True),
    Metric("dropped_fraction", summary=True),
)


def load_metrics(counts_E: jax.Array) -> dict[str, jax.Array]:
  """Load fraction per expert, max/mean load and coefficient of variation."""
  total = jnp.maximum(jnp.sum(counts_E), 1.0)
  load_E = counts_E / total
  mean = jnp.maximum(jnp.mean(load_E), 1e-12)  # no valid slot: 0, not NaN
  return {
      "load": load_E,
      "load_max_over_mean": jnp.max(load_E) / mean,
      "load_cv": jnp.std(load_E) / mean,
  }


def mean_entropy(probs_TxE: jax.Array) -> jax.Array:
  """Mean over tokens of -sum_e p log p (nats); 0 log 0 = 0, with finite gradients."""
  p = probs_TxE.astype(jnp.float32)
  return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def router_metrics(probs_TxE: jax.Array) -> dict[str, jax.Array]:
  """Mean router entropy (nats) and mean top-1 probability."""
  p = probs_TxE.astype(jnp.float32)
  return {"router_entropy": mean_entropy(p), "top1_prob": jnp.mean(jnp.max(p, axis=-1))}
