"""Streaming safetensors I/O: read a Hugging Face checkpoint one tensor at a time, write shards.

A checkpoint directory holds either `model.safetensors` or shards listed by
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}).
`TensorReader` opens each shard once with `safetensors.safe_open` and reads
tensors on demand (as float32 NumPy arrays), so converting never holds more
than the moejax parameters plus one tensor. `write_tensors` writes shards of
at most `max_shard_bytes` and the index when there is more than one.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from moejax.interop.errors import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorReader:
  """Named tensors of a checkpoint directory, read one at a time (context manager)."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index, single = os.path.join(hf_dir, INDEX), os.path.join(hf_dir, SINGLE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no 'weight_map' {{tensor name: shard file}}")
      self.shard_of = dict(weight_map)
    elif os.path.exists(single):
      self.shard_of = None
    else:
      raise ConversionError(f"{hf_dir!r} has neither {SINGLE} nor {INDEX} (only safetensors "
                            "checkpoints are read; convert .bin files with transformers first)")
    self._handles: dict[str, object] = {}
    if self.shard_of is None:
      self.shard_of = {name: SINGLE for name in self._open(SINGLE).keys()}

  def _open(self, shard: str, framework: str = "numpy"):
    from safetensors import safe_open  # noqa: PLC0415

    key = f"{framework}:{shard}"
    if key not in self._handles:
      path = os.path.join(self.hf_dir, shard)
      if not os.path.exists(path):
        raise ConversionError(f"shard {shard!r} named in {INDEX} is missing from {self.hf_dir!r}")
      self._handles[key] = safe_open(path, framework)
    return self._handles[key]

  def names(self) -> list[str]:
    return sorted(self.shard_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self.shard_of[name]).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 (bfloat16 goes through JAX: NumPy has no bfloat16)."""
    if name not in self.shard_of:
      raise ConversionError(f"missing tensor {name!r} in {self.hf_dir!r}")
    shard = self.shard_of[name]
    if self._open(shard).get_slice(name).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
      return np.asarray(self._open(shard, "flax").get_tensor(name), np.float32)
    return np.asarray(self._open(shard).get_tensor(name), np.float32)

  def close(self) -> None:
    self._handles.clear()

  def __enter__(self) -> "TensorReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_tensors(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 2 << 30) -> list[str]:
  """Writes (name, array) pairs as safetensors shards (+ index if several); returns the files.

  One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors`
  with `model.safetensors.index.json`, the layout `from_pretrained` reads.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in tensors:
    x = np.ascontiguousarray(x)
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    if any(name in s for s in shards):
      raise ConversionError(f"tensor {name!r} written twice")
    shards[-1][name] = x
    size += x.nbytes
  n = len(shards)
  files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_map, total = {}, 0
  for fname, shard in zip(files, shards):
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    for name, x in shard.items():
      weight_map[name] = fname
      total += x.nbytes
  if n > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                sort_keys=True)
  return files
