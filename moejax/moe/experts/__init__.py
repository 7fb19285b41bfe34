"""Expert-family registry: `moe.expert=<name>` picks a family (moejax/moe/experts/base.py).

Adding a family is one file here (a frozen dataclass subclassing
`ExpertFamily`), one `register` line below, and one test.
"""

from __future__ import annotations

from moejax.checks import choice
from moejax.moe.experts.base import (ExpertFamily, Experts, ExpertWeights, Leaf,
                                     SharedExperts, expert_specs, group_of_rows, row_norms)
from moejax.moe.experts.latent import LatentExperts
from moejax.moe.experts.mlp import MLPExperts
from moejax.moe.experts.swiglu import SwiGLUExperts

FAMILIES: dict[str, type[ExpertFamily]] = {}


def register(cls: type[ExpertFamily]) -> type[ExpertFamily]:
  """Adds a family class to FAMILIES under its `name` (usable as a class decorator)."""
  if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
    raise ValueError(f"expert family {cls.name!r} registered twice")
  FAMILIES[cls.name] = cls
  return cls


def family_class(name: str) -> type[ExpertFamily]:
  if name not in FAMILIES:
    raise ValueError(f"moe.expert={name!r} is not a known expert family; "
                     f"allowed: {sorted(FAMILIES)}")
  return FAMILIES[name]


def get_family(cfg_moe) -> ExpertFamily:
  """The family instance the `moe` config selects (with its options)."""
  return family_class(cfg_moe.get("expert", "swiglu")).from_config(cfg_moe)


def check_config(cfg) -> None:
  """moe.expert and the chosen family's options."""
  choice(cfg.moe.expert, "moe.expert", FAMILIES)
  FAMILIES[cfg.moe.expert].check_config(cfg)


register(SwiGLUExperts)
register(MLPExperts)
register(LatentExperts)

__all__ = ["FAMILIES", "ExpertFamily", "ExpertWeights", "Experts", "LatentExperts", "Leaf",
           "MLPExperts",
           "SharedExperts", "SwiGLUExperts",
           "check_config", "expert_specs", "family_class", "get_family", "group_of_rows",
           "register", "row_norms"]
