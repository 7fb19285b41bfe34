"""Hugging Face checkpoint directory <-> moejax run directory.

`from_hf(hf_dir, run_dir)` writes an ordinary run directory: config.json
(the moejax config), checkpoints/0 (the trainer's orbax format: params,
fresh optimizer state, router state, data iterator state), and
hf_config.json (the source config.json, so `to_hf` keeps the family and
the keys moejax does not model: token ids, max_position_embeddings).
`python -m experiments --workdir RUN_DIR` continues training from it. The
checkpoint's tokenizer files (tokenizer.json and its config) are copied to
RUN_DIR/tokenizer and `data.tokenizer` names that copy; `to_hf` copies the
run's tokenizer out again.
`to_hf(run_dir, hf_dir)` writes config.json + safetensors shards that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
Both stream (moejax/interop/streaming.py): memory holds about one layer slice
of one leaf, not the checkpoint (docs/benchmarks.md, "Checkpoint conversion
memory"); `load_hf` is the in-memory read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from moejax.interop import mapping, registry
from moejax.interop.errors import ConversionError
from moejax.interop.hf_config import HFConfig
from moejax.interop.safetensors_io import TensorReader

HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "tokenizer"  # a run directory's copy of the checkpoint's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# Keys `from_hf` may set besides the mapped ones: they do not change the model.
OVERRIDABLE = ("name", "seed", "train.", "data.", "parallel.", "moe.dispatch", "moe.gmm_backend",
               "moe.capacity_factor", "moe.aux_loss_weight", "moe.z_loss_weight", "moe.balance",
               "moe.sigmoid_bias.rate", "model.dtype", "model.remat")


def read_hf_config(hf_dir: str) -> dict:
  """config.json of a local checkpoint directory (a hub name is refused: download it first)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    parts = hf_dir.split("/")
    hub_like = (not os.path.exists(hf_dir) and len(parts) == 2 and all(parts)
                and not hf_dir.startswith("."))
    hint = (f"; if it is a hub name, download it first: `huggingface-cli download {hf_dir} "
            "--local-dir DIR`, then pass DIR" if hub_like else "")
    raise ConversionError(f"{hf_dir!r} is not a checkpoint directory{hint}")
  if not os.path.exists(path):
    raise ConversionError(f"{hf_dir!r} has no config.json")
  with open(path) as f:
    return json.load(f)


def hf_to_config(hf_dict: dict) -> ml_collections.ConfigDict:
  """The moejax config of a Hugging Face config.json (refusing what is not supported)."""
  model_type = hf_dict.get("model_type")
  fam = registry.get(model_type)
  hf = HFConfig(hf_dict, model_type)
  cfg = fam.module.config_from_hf(hf)
  hf.finish()
  return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """`--set KEY=VALUE` items -> {key: value}: JSON values, else the string as given."""
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set {item!r} must be KEY=VALUE")
    key, value = item.split("=", 1)
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def _apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  for key, value in overrides.items():
    if not any(key == o or (o.endswith(".") and key.startswith(o)) for o in OVERRIDABLE):
      raise ConversionError(f"override {key}={value!r} is not allowed: the converted "
                            f"checkpoint fixes it; allowed: {list(OVERRIDABLE)}")
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ConversionError(f"override {key}={value!r}: unknown config key")
    node[leaf] = value


def _validate(cfg: ml_collections.ConfigDict, what: str) -> None:
  from moejax.validation import validate  # noqa: PLC0415

  try:
    validate(cfg)
  except ValueError as e:
    raise ConversionError(f"{what} is not a valid moejax config: {e}") from e


def _hf_source(hf_dir: str, overrides: dict[str, Any] | None):
  """(moejax config, HF config dict, family) of a checkpoint directory, validated."""
  hf_dict = read_hf_config(hf_dir)
  cfg = hf_to_config(hf_dict)
  if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
    cfg.data.tokenizer = os.path.abspath(hf_dir)  # from_hf points it at the run's copy
  _apply_overrides(cfg, overrides or {})
  _validate(cfg, f"the config converted from {hf_dir!r}")
  return cfg, hf_dict, registry.get(hf_dict["model_type"])


def load_hf(hf_dir: str, overrides: dict[str, Any] | None = None
            ) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(moejax config, variables {collection: tree of float32 arrays}, the HF config dict),
  all in memory (`from_hf` streams instead)."""
  cfg, hf_dict, fam = _hf_source(hf_dir, overrides)
  with TensorReader(hf_dir) as reader:
    variables = mapping.from_hf(cfg, fam.module.tensors(cfg, hf_dict), reader)
  return cfg, variables, hf_dict


def from_hf(hf_dir: str, run_dir: str, overrides: dict[str, Any] | None = None
            ) -> ml_collections.ConfigDict:
  """Writes the run directory of a Hugging Face checkpoint; returns its config.

  Streams: every tensor is checked first (names, shapes), then each leaf of the
  checkpoint is written one layer slice at a time (moejax.interop.streaming).
  """
  from moejax.interop import streaming  # noqa: PLC0415

  for name in ("config.json", "checkpoints"):
    if os.path.exists(os.path.join(run_dir, name)):
      raise ConversionError(f"run directory {run_dir!r} already holds {name}; give a new one")
  cfg, hf_dict, fam = _hf_source(hf_dir, overrides)
  with TensorReader(hf_dir) as reader:
    leaves = mapping.read_plan(cfg, fam.module.tensors(cfg, hf_dict), reader)
    os.makedirs(run_dir, exist_ok=True)
    if cfg.data.tokenizer == os.path.abspath(hf_dir):
      _copy_tokenizer(hf_dir, os.path.join(run_dir, TOKENIZER_DIR))
      cfg.data.tokenizer = os.path.abspath(os.path.join(run_dir, TOKENIZER_DIR))
    streaming.write_run(cfg, leaves, reader, run_dir)
  with open(os.path.join(run_dir, HF_CONFIG), "w") as f:
    json.dump(hf_dict, f, indent=2, sort_keys=True)
  return cfg


def _copy_tokenizer(src: str, dst: str) -> None:
  import shutil  # noqa: PLC0415

  os.makedirs(dst, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def to_hf(run_dir: str, hf_dir: str, *, step: int = -1, model_type: str | None = None,
          max_shard_bytes: int = 2 << 30) -> dict:
  """Writes config.json + safetensors of a run's checkpoint; returns the config.json dict.

  Streams: only the params (and moe_state) are read, one chunk of one leaf at a time,
  each tensor written into its shard as soon as it is converted. Merged and quantized
  experts are written as the plain float experts they stand for (moejax/interop/compressed.py).
  """
  from moejax.init.sources import run_arrays, run_config  # noqa: PLC0415
  from moejax.interop import streaming  # noqa: PLC0415

  from moejax.interop import compressed  # noqa: PLC0415

  cfg = run_config(run_dir)
  stored_cfg = cfg
  if compressed.is_compressed(cfg) or cfg.moe.get("skip_threshold", 0.0):
    cfg = compressed.plain_config(cfg)  # merged / quantized experts: written as plain ones
  origin = {}
  if os.path.exists(os.path.join(run_dir, HF_CONFIG)):
    with open(os.path.join(run_dir, HF_CONFIG)) as f:
      origin = json.load(f)
  model_type = model_type or origin.get("model_type")
  fam = registry.for_export(cfg, model_type)
  if origin.get("model_type") != fam.model_type:
    origin = {}
  hf_dict = fam.module.config_to_hf(cfg, origin)
  hf_dict["transformers_version"] = origin.get("transformers_version", "5.25.0")
  arrays, _ = run_arrays(run_dir, step)
  if compressed.is_compressed(stored_cfg):
    arrays = compressed.PlainExperts(arrays, stored_cfg)
  os.makedirs(hf_dir, exist_ok=True)
  streaming.export(cfg, fam.module.tensors(cfg, hf_dict), arrays, hf_dir, max_shard_bytes)
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(hf_dict, f, indent=2, sort_keys=True)
  tokenizer = cfg.data.get("tokenizer", "bytes")
  if tokenizer and tokenizer != "bytes":
    src = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
    _copy_tokenizer(src, hf_dir)
  return hf_dict
