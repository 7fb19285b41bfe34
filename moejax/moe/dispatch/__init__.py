"""Dispatcher registry: `moe.dispatch=<name>`.

A dispatcher is a pure function
  dispatch(x_TxD, assignment, experts, *, cfg) -> (y_TxD float32, stats)
that applies the experts (`ExpertWeights`: weights bound to their family and
compute dtype, moejax/moe/experts) to the tokens named by any sparse
`Assignment` and combines their outputs with the assignment weights. It
calls only the family's `batched` / `grouped` and names no weight. `stats` holds at
least `dropped_fraction` (share of valid assignment slots not computed).
"""

from __future__ import annotations

from typing import Callable

from moejax.moe.dispatch.capacity import capacity_dispatch
from moejax.moe.dispatch.dense import dense_dispatch
from moejax.moe.dispatch.dropless import dropless_dispatch

DISPATCHERS: dict[str, Callable] = {
    "dense": dense_dispatch,
    "capacity": capacity_dispatch,
    "dropless": dropless_dispatch,
}


def get_dispatcher(name: str) -> Callable:
  if name not in DISPATCHERS:
    raise ValueError(f"moe.dispatch={name!r} is not a known dispatcher; "
                     f"allowed: {sorted(DISPATCHERS)}")
  return DISPATCHERS[name]


__all__ = ["DISPATCHERS", "get_dispatcher"]
