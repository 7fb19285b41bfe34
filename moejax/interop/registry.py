"""The family registry: Hugging Face `model_type` <-> the module that maps it.

A family module (moejax/interop/families/<model_type>.py) defines
`config_from_hf(hf: HFConfig) -> moejax config`, `tensors(cfg, hf_config_dict) -> [Group]`,
`export_reasons(cfg) -> [str]` (what of a moejax config it cannot hold; empty
= it can) and `config_to_hf(cfg, origin) -> config.json dict`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import ml_collections

from moejax.interop import decoder
from moejax.interop.errors import ConversionError

# Export tries them in this order when the run does not name its family.
MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "llama", "qwen3")


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  module: ModuleType

  def reasons(self, cfg: ml_collections.ConfigDict) -> list[str]:
    return decoder.export_reasons(cfg) + self.module.export_reasons(cfg)


def get(model_type: str) -> Family:
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"config.json key model_type={model_type!r} is not supported; "
                          f"supported: {list(MODEL_TYPES)}")
  return Family(model_type, importlib.import_module(f"moejax.interop.families.{model_type}"))


def for_export(cfg: ml_collections.ConfigDict, model_type: str | None = None) -> Family:
  """The family that holds `cfg` (`model_type` if given), else an error with every reason."""
  if model_type is not None:
    fam = get(model_type)
    why = fam.reasons(cfg)
    if why:
      raise ConversionError(f"this moejax model has no {model_type} equivalent: "
                            + "; ".join(why))
    return fam
  tried = []
  for name in MODEL_TYPES:
    fam = get(name)
    why = fam.reasons(cfg)
    if not why:
      return fam
    tried.append(f"{name}: " + "; ".join(why))
  raise ConversionError("this moejax model has no Hugging Face equivalent among the supported "
                        "families:\n  " + "\n  ".join(tried))
