"""Hugging Face interop: import and export MoE (and dense) checkpoints with logits parity.

safetensors_io (streaming reads, sharded writes), hf_config (strict
config.json reading), mapping (HF tensors <-> the moejax tree), decoder (what
the families share), families/<model_type> (one per family), registry,
convert (run directory <-> checkpoint directory), streaming (both ways one
leaf slice at a time). CLI: tools/convert.py;
docs/checkpoints.md.
"""

from moejax.interop.convert import from_hf, hf_to_config, load_hf, parse_overrides, to_hf
from moejax.interop.errors import ConversionError

__all__ = ["ConversionError", "from_hf", "hf_to_config", "load_hf", "parse_overrides",
           "to_hf"]
