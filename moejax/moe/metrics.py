"""Per-layer routing metrics (float32), the fixed schema every MoE layer reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def router_metrics(probs_TxE: jax.Array) -> dict[str, jax.Array]:
  """Mean router entropy (nats) and mean top-1 probability."""
  p = probs_TxE.astype(jnp.float32)
  entropy_T = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)
  return {"router_entropy": jnp.mean(entropy_T),
          "top1_prob": jnp.mean(jnp.max(p, axis=-1))}
