"""Dynamic expert skipping at inference: drop a token's low-weight extra experts.

With `moe.skip_threshold` = tau > 0, a valid assignment slot whose combine
weight is below tau is not computed, unless it is its token's heaviest
slot (every token keeps at least one expert). The kept weights are not
renormalised: the skipped expert's share of the output is simply left out,
as when a top-2 model runs its second expert only when it matters (Lu et
al. 2024, "Not All Experts are Equal"). It applies to every router that
returns a sparse `Assignment` and to every dispatcher (skipped slots are
invalid slots); the layer reports the share of skipped expert calls as the
`skipped_fraction` metric (per batch, padding included), and
`moejax.eval.expert_calls` counts them over real tokens (tools/evaluate.py
--skip-threshold).
Training is unaffected unless the config sets it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.types import Assignment


def skip_low_weight(a: Assignment, num_tokens: int, threshold: float
                    ) -> tuple[Assignment, jax.Array]:
  """(the assignment without the skipped slots, skipped / valid slots as a float32 scalar)."""
  w_A = jnp.where(a.valid, a.weight.astype(jnp.float32), -jnp.inf)
  top_T = jax.ops.segment_max(w_A, a.token, num_segments=num_tokens)
  skip_A = a.valid & (w_A < threshold) & (w_A < top_T[a.token])
  valid = jnp.sum(a.valid.astype(jnp.float32))
  fraction = jnp.sum(skip_A.astype(jnp.float32)) / jnp.maximum(valid, 1.0)
  return a.replace(valid=a.valid & ~skip_A), fraction

