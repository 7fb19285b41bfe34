"""The compression-method contract: what tools/compress.py needs from each method family.

A method declares its command-line options (`Option`), whether it needs a
`Calibration` of the source model, a `check` that validates the options
against the source config before anything is read, and an `apply` that
returns the compressed model (`Result`: new config, new variables, and the
method's own entry of compress.json). tools/compress.py owns what every
method shares: the run directories, calibration, the report, composition.

Adding a method is one module in moejax/compress/ that defines a `METHOD`,
one line in moejax/compress/__init__.py's METHODS, and one test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from moejax import layout
from moejax.moe.experts import get_family
from moejax.moe import pool as pool_lib


@dataclasses.dataclass(frozen=True)
class Option:
  """One method option: its flag and argparse keywords (`required`, `type`, `default`, ...)."""

  flag: str
  kwargs: dict

  @property
  def dest(self) -> str:
    return self.flag.lstrip("-").replace("-", "_")


@dataclasses.dataclass
class Result:
  """What a method returns: the compressed run's config and variables, and its report entry.

  `entry` holds the method's options and what it did, JSON-serialisable;
  tools/compress.py adds the method name, the source run and the step.
  `arrays` are extra NumPy arrays the tool stores beside compress.json
  (e.g. a merge's expert map), keyed by file-name stem.
  """

  cfg: ml_collections.ConfigDict
  variables: dict
  entry: dict
  arrays: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
  """A compression method as the CLI runs it.

  check(cfg, args): raise ValueError naming the option for bad options
      (before any checkpoint is read).
  apply(cfg, variables, calib, args, previous): the Result; `calib` is None
      unless `calibrates(args)`; `previous` are the compress.json entries of
      the compressions the source run already had.
  calibrates(args): whether `apply` needs a Calibration with these options.
  after_write(out, args): optional; run once OUT_DIR is a complete run
      directory (config.json, checkpoint, compress.json), for methods that go on
      working in it (distillation trains there); the dict it returns is merged
      into the method's compress.json entry, which is then rewritten.
  """

  name: str
  summary: str
  options: tuple[Option, ...]
  check: Callable[[ml_collections.ConfigDict, Any], None]
  apply: Callable[..., Result]
  calibrates: Callable[[Any], bool] = lambda args: True
  describe: Callable[[dict], list[str]] = lambda entry: []
  after_write: Callable[[str, Any], dict] | None = None

  def flags(self) -> set[str]:
    return {o.flag for o in self.options}


def check_routed_experts(cfg: ml_collections.ConfigDict, verb: str) -> None:
  """ValueError naming the option unless `cfg` has float routed experts of its own that a
  method may `verb` (prune, merge, quantize): an MoE, not an adapter run."""
  moe = cfg.moe
  if not moe.enabled or not layout.moe_layer_indices(cfg):
    raise ValueError("moe.enabled=False: the run is not an MoE; a dense run has no routed "
                     f"experts to {verb}")
  a = moe.get("adapters")
  if a is not None and a.get("enabled", False):
    raise ValueError("moe.adapters.enabled=True: an adapter run is tied to the experts of its "
                     f"base run (moe.adapters.base={a.base!r}); {verb} the base run instead")
  if not layout.is_uniform(cfg):
    raise ValueError(f"moe.layer_schedule.kind={moe.layer_schedule.kind!r}: the run's MoE "
                     f"layers have different experts {[e for e, _ in layout.moe_schedule(cfg)]}"
                     f" (a layer-wise schedule); tools/compress.py can {verb} only models whose "
                     "MoE layers are alike (one MoE stack)")
  why = pool_lib.refusal(cfg, f"tools/compress.py ({verb})")
  if why:
    raise ValueError(why)


def check_own_leaves(cfg: ml_collections.ConfigDict, verb: str) -> None:
  """ValueError naming moe.expert when its family has leaves shared by all experts of a layer
  (moe.expert="latent"), which a method that rebuilds each expert on its own cannot `verb`."""
  shared = sorted(get_family(cfg.moe).shared_leaves())
  if shared:
    raise ValueError(f"moe.expert={cfg.moe.expert!r}: its leaves {shared} are shared by all "
                     f"experts of a layer; {verb} works on experts that own all their weights "
                     "(e.g. moe.expert='swiglu')")


def quant_scheme(cfg: ml_collections.ConfigDict) -> str:
  """moe.quant.scheme ("none" when the run's experts are float)."""
  return cfg.moe.get("quant", {}).get("scheme", "none")
