"""Streaming safetensors I/O: read a Hugging Face checkpoint one tensor at a time, write shards.

A checkpoint directory holds either `model.safetensors` or shards listed by
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}).
A safetensors file is an 8-byte little-endian header length, a JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}}, optional
"__metadata__", padded with spaces to 8 bytes) and the tensors' bytes.

`TensorReader` parses each shard's header once and reads a tensor's bytes
with plain file reads when asked (no memory map, so pages already read do
not stay in the process: converting holds one tensor, not the shards).
`ShardWriter` lays out shards from the tensors' names and shapes up front
and writes each tensor into its place as soon as it is given, in any order;
`write_tensors` writes (name, array) pairs holding one shard at a time. Both
write shards of at most `max_shard_bytes` (a tensor larger alone gets its
own), `model.safetensors` or `model-0000i-of-0000n.safetensors` with the
index, byte for byte what `safetensors.numpy.save_file` writes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Sequence

import numpy as np

from moejax.interop.errors import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
METADATA = {"format": "pt"}


def _dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # noqa: PLC0415 -- installed with jax: bfloat16 and float8

  return {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
          "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"),
          "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
          "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"),
          "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


def read_header(path: str) -> tuple[dict[str, dict], int]:
  """({tensor name: {"dtype", "shape", "data_offsets"}}, offset of the data) of a file."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path!r} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
      raise ConversionError(f"{path!r} is not a safetensors file (header of {n} bytes in a "
                            f"file of {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{path!r} has an unreadable safetensors header: {e}") from None
  header.pop("__metadata__", None)
  for name, entry in header.items():
    begin, end = entry.get("data_offsets", (0, -1))
    if not 0 <= begin <= end <= size - 8 - n:
      raise ConversionError(f"{path!r}: tensor {name!r} has data_offsets {[begin, end]} "
                            f"outside the file's {size - 8 - n} data bytes")
  return header, 8 + n


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
    self._headers: dict[str, tuple[dict, int]] = {}
    self._files: dict[str, object] = {}
    if self.shard_of is None:
      self.shard_of = {name: SINGLE for name in self._header(SINGLE)[0]}

  def _header(self, shard: str) -> tuple[dict, int]:
    if shard not in self._headers:
      path = os.path.join(self.hf_dir, shard)
      if not os.path.exists(path):
        raise ConversionError(f"shard {shard!r} named in {INDEX} is missing from {self.hf_dir!r}")
      self._headers[shard] = read_header(path)
    return self._headers[shard]

  def _entry(self, name: str) -> dict:
    if name not in self.shard_of:
      raise ConversionError(f"missing tensor {name!r} in {self.hf_dir!r}")
    shard = self.shard_of[name]
    header, _ = self._header(shard)
    if name not in header:
      raise ConversionError(f"tensor {name!r}, which {INDEX} puts in {shard!r}, is not in it")
    return header[name]

  def names(self) -> list[str]:
    return sorted(self.shard_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in self._entry(name)["shape"])

  def get(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 (bfloat16 and float8 through ml_dtypes: exact)."""
    entry = self._entry(name)
    shard = self.shard_of[name]
    dtype = _dtypes().get(entry["dtype"])
    if dtype is None:
      raise ConversionError(f"tensor {name!r} has dtype {entry['dtype']!r}; readable: "
                            f"{sorted(_dtypes())}")
    shape = self.shape(name)
    begin, end = entry["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise ConversionError(f"tensor {name!r} in {shard!r}: data_offsets {[begin, end]} do not "
                            f"hold {entry['dtype']} {list(shape)}")
    if shard not in self._files:
      self._files[shard] = open(os.path.join(self.hf_dir, shard), "rb")  # noqa: SIM115
    f = self._files[shard]
    raw = np.empty(math.prod(shape), dtype)
    f.seek(self._header(shard)[1] + begin)
    if f.readinto(raw.view(np.uint8)) != end - begin:
      raise ConversionError(f"tensor {name!r}: {shard!r} is truncated")
    return raw.reshape(shape).astype(np.float32, copy=False)

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()

  def __enter__(self) -> "TensorReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def shard_names(n: int) -> list[str]:
  """File names of n shards, as `from_pretrained` reads them."""
  return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(entries: dict[str, tuple[Sequence[int], int]]) -> bytes:
  """The header of a float32 file of {name: (shape, nbytes)}, laid out in name order (as
  safetensors' own writer: by dtype, then name), padded with spaces to 8 bytes."""
  header, offset = {"__metadata__": METADATA}, 0
  for name in sorted(entries):
    shape, nbytes = entries[name]
    header[name] = {"dtype": "F32", "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
  return raw + b" " * (-len(raw) % 8)


def _write_index(out_dir: str, files: list[str], shards: list[dict[str, int]]) -> None:
  weight_map = {name: fname for fname, shard in zip(files, shards) for name in shard}
  total = sum(nbytes for shard in shards for nbytes in shard.values())
  with open(os.path.join(out_dir, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
              sort_keys=True)


def _split(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[dict[str, int]]:
  """Consecutive tensors in shards of at most `max_shard_bytes` ({name: nbytes} each)."""
  shards: list[dict[str, int]] = [{}]
  size = 0
  seen = set()
  for name, nbytes in sizes:
    if name in seen:
      raise ConversionError(f"tensor {name!r} written twice")
    seen.add(name)
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = nbytes
    size += nbytes
  return shards


class ShardWriter:
  """float32 safetensors shards of tensors known by name and shape, filled in any order.

  The shards are planned from `tensors` ((name, shape) in order) and created with their
  headers; `write(name, array)` puts one tensor in its place; `close()` checks that
  every tensor was written and writes the index.
  """

  def __init__(self, out_dir: str, tensors: Sequence[tuple[str, Sequence[int]]],
               max_shard_bytes: int = 2 << 30):
    if max_shard_bytes <= 0:
      raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
    self.out_dir = out_dir
    self._shapes = {name: tuple(int(d) for d in shape) for name, shape in tensors}
    self._shards = _split(((n, 4 * math.prod(s)) for n, s in tensors), max_shard_bytes)
    self.files = shard_names(len(self._shards))
    self._place: dict[str, tuple[int, int]] = {}  # name -> (shard, byte offset in the file)
    self._left = set(self._shapes)
    os.makedirs(out_dir, exist_ok=True)
    self._handles = []
    for k, (fname, shard) in enumerate(zip(self.files, self._shards)):
      head = _header_bytes({n: (self._shapes[n], b) for n, b in shard.items()})
      offset = 8 + len(head)
      for name in sorted(shard):
        self._place[name] = (k, offset)
        offset += shard[name]
      f = open(os.path.join(out_dir, fname), "wb")  # noqa: SIM115
      f.write(struct.pack("<Q", len(head)) + head)
      f.truncate(offset)
      self._handles.append(f)

  def write(self, name: str, x: np.ndarray) -> None:
    if name not in self._shapes:
      raise ConversionError(f"internal: tensor {name!r} is not in the planned shards")
    if name not in self._left:
      raise ConversionError(f"tensor {name!r} written twice")
    x = np.ascontiguousarray(x, np.float32)
    if x.shape != self._shapes[name]:
      raise ConversionError(f"internal: tensor {name!r} has shape {list(x.shape)}, planned "
                            f"{list(self._shapes[name])}")
    k, offset = self._place[name]
    f = self._handles[k]
    f.seek(offset)
    f.write(x.reshape(-1).view(np.uint8))
    self._left.discard(name)

  def abort(self) -> None:
    """Closes the files after a failure (they are incomplete)."""
    for f in self._handles:
      f.close()
    self._handles = []

  def close(self) -> list[str]:
    """Closes the files, writes the index (several shards); returns the file names."""
    for f in self._handles:
      f.close()
    self._handles = []
    if self._left:
      left = sorted(self._left)
      raise ConversionError(f"internal: tensors never written ({len(left)}): {left[:8]}")
    if len(self.files) > 1:
      _write_index(self.out_dir, self.files, self._shards)
    return self.files


def write_tensors(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int = 2 << 30) -> list[str]:
  """Writes (name, array) pairs as safetensors shards (+ index if several), holding one
  shard at a time; returns the files.

  One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors`
  with `model.safetensors.index.json`, the layout `from_pretrained` reads.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  os.makedirs(out_dir, exist_ok=True)
  done: list[dict[str, int]] = []  # {name: nbytes} of each written shard
  seen: set[str] = set()
  shard: dict[str, np.ndarray] = {}
  size = 0

  def flush():
    save_file(shard, os.path.join(out_dir, f".shard-{len(done)}.tmp"), metadata=METADATA)
    done.append({n: x.nbytes for n, x in shard.items()})

  for name, x in tensors:
    x = np.ascontiguousarray(x)
    if name in seen:
      raise ConversionError(f"tensor {name!r} written twice")
    seen.add(name)
    if shard and size + x.nbytes > max_shard_bytes:
      flush()
      shard, size = {}, 0
    shard[name] = x
    size += x.nbytes
  flush()
  files = shard_names(len(done))
  for k, fname in enumerate(files):
    os.replace(os.path.join(out_dir, f".shard-{k}.tmp"), os.path.join(out_dir, fname))
  if len(files) > 1:
    _write_index(out_dir, files, done)
  return files
