"""Router registry: `moe.router=<name>` picks a router module by name.

A router is a Flax module holding its parameters; its routing math is a pure
function in the same file. `__call__(x_TxD, *, shape_BxL, token_ids,
deterministic)` returns a `RouterOutput`.
"""

from __future__ import annotations

import flax.linen as nn

from moejax.moe.routers.base import RouterOutput

ROUTERS: dict[str, type[nn.Module]] = {}


def register(name: str):
  """Class decorator adding a router module to `ROUTERS` under `name`."""

  def wrap(cls):
    if name in ROUTERS:
      raise ValueError(f"router {name!r} registered twice")
    ROUTERS[name] = cls
    return cls

  return wrap


def get_router(name: str) -> type[nn.Module]:
  if name not in ROUTERS:
    raise ValueError(
        f"moe.router={name!r} is not a known router; allowed: {sorted(ROUTERS)}")
  return ROUTERS[name]


# Importing a router module registers it.
from moejax.moe.routers import topk as _topk  # noqa: E402,F401
from moejax.moe.routers import expert_choice as _expert_choice  # noqa: E402,F401
from moejax.moe.routers import group_limited as _group_limited  # noqa: E402,F401
from moejax.moe.routers import hash as _hash  # noqa: E402,F401
from moejax.moe.routers import null_experts as _null_experts  # noqa: E402,F401
from moejax.moe.routers import top_p as _top_p  # noqa: E402,F401
from moejax.moe.routers import recurrent as _recurrent  # noqa: E402,F401
from moejax.moe.routers import relu as _relu  # noqa: E402,F401
from moejax.moe.routers import sigmoid_bias as _sigmoid_bias  # noqa: E402,F401
from moejax.moe.routers import soft as _soft  # noqa: E402,F401
from moejax.moe.routers import thor as _thor  # noqa: E402,F401
from moejax.moe.routers import bip as _bip  # noqa: E402,F401
from moejax.moe.routers import zero_experts as _zero_experts  # noqa: E402,F401
from moejax.moe.routers import smoe_dropout as _smoe_dropout  # noqa: E402,F401
from moejax.moe.routers import dts as _dts  # noqa: E402,F401

__all__ = ["ROUTERS", "RouterOutput", "get_router", "register"]
