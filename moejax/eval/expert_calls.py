"""Routed expert calls of a forward pass, counted over real tokens (dynamic skipping).

`skipped_calls` runs a model over token sequences and counts, per MoE layer
and real (unpadded) token, the expert calls its routing keeps, against
the layer's top-k per token (moe.top_k, or moe.layer_schedule's): with
moe.skip_threshold > 0 (moejax/moe/skipping.py) the difference is the share
of expert calls skipped. tools/evaluate.py --skip-threshold reports it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import layout
from moejax import model as lm
from moejax.moe.routers import get_router


@functools.lru_cache(maxsize=8)
def _calls_fn(frozen: ml_collections.FrozenConfigDict):
  model = lm.make_model(frozen, deterministic=True)

  ks = [k for _, k in layout.moe_schedule(frozen)]

  @jax.jit
  def fn(variables, ids_BxL, mask_BxL):
    _, inter = model.apply(variables, ids_BxL, mutable=["intermediates"])
    calls = 0
    for r in layout.layer_nodes(frozen, inter["intermediates"], ("routing",),
                                "the sown routing"):  # one per MoE layer, leaves [A]
      a = r[0]["assignment"]
      calls = calls + jnp.sum(a.valid & jnp.take(mask_BxL.reshape(-1), a.token))
    return calls, jnp.sum(mask_BxL) * sum(ks)

  return fn


def skipped_calls(cfg: ml_collections.ConfigDict, variables: dict, seqs: list[np.ndarray],
                  batch_size: int = 8) -> dict:
  """{"expert_calls", "possible_calls", "skipped_fraction"} of a forward over `seqs`
  (padding excluded) under cfg's moe.skip_threshold: a measured count of the routed
  expert calls against each MoE layer's top-k per token without skipping."""
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
    calls, possible = calls + int(c), possible + int(n)
  return {"expert_calls": calls, "possible_calls": possible,
          "skipped_fraction": 1.0 - calls / max(possible, 1)}
