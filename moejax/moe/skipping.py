"""Dynamic expert skipping at inference: drop a token's low-weight extra experts.

With `moe.skip_threshold` = tau > 0, a valid assignment slot whose combine
weight is below tau is not computed, unless it is its token's heaviest
slot (every token keeps at least one expert). The kept weights are not
renormalised: the skipped expert's share of the output is simply left out,
as when a top-2 model runs its second expert only when it matters (Lu et
al. 2024, "Not All Experts are Equal"). It applies to every router that
returns a sparse `Assignment` and to every dispatcher (skipped slots are
invalid slots); the layer reports the share of skipped expert calls as the
`skipped_fraction` metric (per batch, padding included) and `skipped_calls`
counts them exactly over real tokens (tools/evaluate.py --skip-threshold).
Training is unaffected unless the config sets it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.moe.routers import get_router
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


@functools.lru_cache(maxsize=8)
def _calls_fn(frozen: ml_collections.FrozenConfigDict):
  from moejax import layout  # noqa: PLC0415
  from moejax import model as lm  # noqa: PLC0415

  model = lm.make_model(frozen, deterministic=True)

  @jax.jit
  def fn(variables, ids_BxL, mask_BxL):
    _, inter = model.apply(variables, ids_BxL, mutable=["intermediates"])
    a = layout.get(inter["intermediates"], layout.MOE_PATH, "the sown routing")[
        "routing"][0]["assignment"]  # leaves [N, A]
    real_NxA = jnp.take(mask_BxL.reshape(-1), a.token)
    return jnp.sum(a.valid & real_NxA), jnp.sum(mask_BxL) * a.token.shape[0]

  return fn


def skipped_calls(cfg: ml_collections.ConfigDict, variables: dict, seqs: list[np.ndarray],
                  batch_size: int = 8) -> dict:
  """{"expert_calls", "possible_calls", "skipped_fraction"} of a forward over `seqs`
  (padding excluded) under cfg's moe.skip_threshold: a measured count of the routed
  expert calls against moe.top_k per token and MoE layer without skipping."""
  if get_router(cfg.moe.router).adaptive:
    raise ValueError(f"moe.router={cfg.moe.router!r} routes a varying number of experts per "
                     "token; skipped calls are counted against moe.top_k choices")
  fn = _calls_fn(ml_collections.FrozenConfigDict(cfg))
  calls = possible = 0
  for start in range(0, len(seqs), batch_size):
    rows = seqs[start:start + batch_size]
    width = max(s.size for s in rows)
    ids = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    for b, s in enumerate(rows):
      ids[b, :s.size], mask[b, :s.size] = s, True
    c, n = jax.device_get(fn(variables, jnp.asarray(ids), jnp.asarray(mask)))
    calls, possible = calls + int(c), possible + int(n) * cfg.moe.top_k
  return {"expert_calls": calls, "possible_calls": possible,
          "skipped_fraction": 1.0 - calls / max(possible, 1)}
