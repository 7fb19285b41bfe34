"""Orbax checkpoints of the training state plus the data iterator position."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts


class IncompatibleCheckpoint(ValueError):
  """The checkpoint's parameters do not have this config's shapes."""


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
          for p, x in flat if hasattr(x, "shape")}


def key_names(keypath) -> tuple:
  """A jax key path as plain names / indices."""
  out = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def layer_stacked(keypath, x) -> bool:
  """Whether a state leaf is a stack of scanned layers (axis 0; params and their moments)."""
  from moejax import layout  # noqa: PLC0415

  return bool(getattr(x, "shape", ())) and any(
      isinstance(n, str) and layout.is_stack(n) for n in key_names(keypath))


def stacked_save_args(state: Any) -> Any:
  """SaveArgs storing each layer-stacked leaf one chunk per layer row (`shard_axes=(0,)`),
  so a reader that wants one layer (to-hf, moejax.interop.streaming) decodes one row."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: ocp.type_handlers.SaveArgs(shard_axes=(0,) if layer_stacked(p, x) else ()),
      state)


class Checkpointer:
  """`workdir/checkpoints/<step>/{state,data}`; keeps the newest `keep` steps.

  `state` is a pytree (params, optimizer state, non-param collections, step,
  wall time); `data` is the grain iterator's JSON state. Orbax writes each
  step to a temporary directory and renames it when complete, so a crash
  mid-save never leaves a half-written step that `latest_step` would return.
  """

  def __init__(self, workdir: str, keep: int):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state, save_args=stacked_save_args(state)),
        data=ocp.args.JsonSave(data_state)))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check_compatible(self, step: int, state_like: Any) -> None:
    """Raises IncompatibleCheckpoint naming the first parameter whose shape differs."""
    try:
      meta = self.manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 -- unreadable metadata: restore() reports it
      return
    meta = getattr(meta, "tree", meta)
    want = _flat_shapes(state_like)
    have = _flat_shapes(meta)
    for path in sorted(set(want) | set(have)):
      if want.get(path) != have.get(path):
        raise IncompatibleCheckpoint(
            f"checkpoint step {step} does not fit this config: {path} has shape "
            f"{have.get(path, 'missing')} in the checkpoint, {want.get(path, 'missing')} "
            "in the model (start a fresh --workdir or use the config the run was made with)")

  def restore(self, step: int, state_like: Any) -> tuple[Any, dict]:
    """(state with the structure/shapes/dtypes of `state_like`, data state)."""
    self.check_compatible(step, state_like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    if not isinstance(out["data"], dict):
      raise ValueError(f"checkpoint step {step}: data iterator state is missing")
    return out["state"], out["data"]

  def restore_latest(self, state_like: Any) -> tuple[int, Any, dict | None]:
    """Newest readable checkpoint: (step, state, data state), or (0, state_like, None).

    An unreadable or truncated newest checkpoint is reported and skipped in
    favour of the previous one; an incompatible one (other shapes) is an error.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(step, state_like)
        return step, state, data
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # noqa: BLE001 -- any read failure means: try older
        print(f"warning: checkpoint step {step} in {self.manager.directory} is unreadable "
              f"({type(e).__name__}: {str(e)[:200]}); trying the previous one")
    return 0, state_like, None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# Streamed saves and sliced reads, for checkpoint conversion (moejax/interop/streaming.py):
# a state is written leaf by leaf, each leaf piece by piece, and read back slice by slice,
# in exactly the format `Checkpointer` writes and restores. They use orbax's own spec
# builders (orbax-checkpoint 0.12.8 internals: tensorstore_utils, ocdbt_utils, the
# ArrayMetadata store), so what they write is what ArrayHandler writes for a single-device
# jax.Array (with SaveArgs(shard_axes=(0,)) for stacked leaves: one chunk per layer row).


def release_freed_memory() -> None:
  """Gives the pages of freed blocks back to the kernel (glibc's malloc_trim; else nothing).

  A converted piece is freed before the next is made, but malloc keeps freed blocks:
  `import pallas_kernels` turns trimming off (the gmm reuses its faulted-in pages), and
  glibc's per-thread arenas (TensorStore's encoding threads) keep theirs. Streamed
  conversion calls this after each piece, so its memory stays about one piece.
  """
  global _malloc_trim  # noqa: PLW0603
  if _malloc_trim is None:
    import ctypes  # noqa: PLC0415

    try:
      _malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
      _malloc_trim = False
  if _malloc_trim:
    _malloc_trim(0)


_malloc_trim = None


@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """A checkpoint leaf made while it is written: never whole in memory when `rows`.

  `piece(i)` returns row i along axis 0 (shape[1:]) when `rows` (a stack of layers,
  stored one chunk per row), else the whole array (i = 0).
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  piece: Callable[[int], np.ndarray]
  rows: bool = False

  @property
  def num_pieces(self) -> int:
    return self.shape[0] if self.rows else 1

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize

  @classmethod
  def zeros(cls, shape: tuple[int, ...], dtype, rows: bool = False) -> "StreamedArray":
    """Zeros, made one piece at a time (optimizer moments of a fresh state)."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    piece_shape = shape[1:] if rows else shape
    return cls(shape, dtype, lambda i: np.zeros(piece_shape, dtype), rows)

  @classmethod
  def of(cls, x) -> "StreamedArray":
    """A leaf that is already in memory (one piece)."""
    x = np.asarray(x)
    return cls(tuple(x.shape), x.dtype, lambda i: x)


class _StreamedArrayHandler(ocp.type_handlers.ArrayHandler):
  """Writes StreamedArray leaves (or host arrays) one piece at a time, in ArrayHandler's format.

  The same zarr spec, `_sharding` entry (single device) and ArrayMetadata entry as
  ArrayHandler.serialize; each piece is written (non-transactionally, so it is not
  kept for a final commit) and dropped before the next is made.
  """

  async def serialize(self, values, infos, args=None):
    from orbax.checkpoint._src.metadata import sharding as sharding_metadata  # noqa: PLC0415
    from orbax.checkpoint._src.serialization import ocdbt_utils  # noqa: PLC0415
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # noqa: PLC0415

    if jax.process_count() > 1:
      raise ValueError("streamed checkpoint saves are single-process")
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    sharding = sharding_metadata.from_jax_sharding(
        jax.sharding.SingleDeviceSharding(jax.devices()[0])).to_serialized_string()
    sharding_txn = ts.Transaction()
    metadatas = []
    for value, info, arg in zip(values, infos, args):
      if not isinstance(value, StreamedArray):
        value = StreamedArray.of(value)
      await info.await_path_creation()
      if value.rows:
        arg = dataclasses.replace(arg, shard_axes=(0,))
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.shape,
          dtype=np.dtype(value.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(info.is_ocdbt_checkpoint),
          metadata_key=self._metadata_key)
      t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
      want = value.shape[1:] if value.rows else value.shape
      for i in range(value.num_pieces):
        block = np.asarray(value.piece(i), value.dtype, order="C")
        if block.shape != want:
          raise ValueError(f"streamed leaf {info.name}: piece {i} has shape {block.shape}, "
                           f"expected {want}")
        # The piece is not touched again: TensorStore may encode it in place (no copy).
        await (t[i] if value.rows else t).write(block,
                                                can_reference_source_data_indefinitely=True)
        del block
        release_freed_memory()
      metadatas.append(spec.metadata)
      sharding_ts = await ts.open(
          ts_utils.get_sharding_tensorstore_spec(info.parent_dir.as_posix(), info.name),
          open=True, context=info.ts_context)
      await sharding_ts.with_transaction(sharding_txn).write(sharding)
    await sharding_txn.commit_async()
    if self._array_metadata_store is not None and infos:
      await self._array_metadata_store.write(checkpoint_dir=infos[0].parent_dir,
                                             array_metadatas=metadatas, process_index=0)
    return []


def _streamed_state_handler() -> ocp.StandardCheckpointHandler:
  """The StandardCheckpointHandler `Checkpointer` uses for "state" (so the step records the
  same handler), saving through `_StreamedArrayHandler`: in orbax 0.12.8 it delegates to
  the PyTreeCheckpointHandler `_impl` and accepts the leaf types `_supported_types`."""
  from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415

  handler = ocp.StandardCheckpointHandler()
  if not (hasattr(handler, "_impl") and hasattr(handler, "_supported_types")):
    raise RuntimeError("streamed saves need orbax-checkpoint's StandardCheckpointHandler "
                       "with `_impl` / `_supported_types` (0.12.8); this version lacks them")
  streamed = _StreamedArrayHandler(array_metadata_store=array_metadata_store.Store())
  registry = ocp.type_handlers.create_type_handler_registry(
      (StreamedArray, streamed),
      (jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store())))
  handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96,  # noqa: SLF001
                                              type_handler_registry=registry)
  handler._supported_types = tuple(handler._supported_types) + (StreamedArray,)  # noqa: SLF001
  return handler


def save_streamed(workdir: str, step: int, state: Any, data_state: dict, keep: int) -> None:
  """`Checkpointer(workdir, keep).save(step, state, data_state)` for a state whose array
  leaves may be StreamedArray: one piece of one leaf in memory at a time."""
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False),
      item_handlers={"state": _streamed_state_handler(), "data": ocp.JsonCheckpointHandler()})
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(data_state)))
    manager.wait_until_finished()
  finally:
    manager.close()


class StoredArrays:
  """The arrays of one step's "state" item, read leaf by leaf or in row blocks along axis 0.

  Reads only what is asked (no restore of the whole state: no optimizer moments). A
  block is whole chunks: one row for checkpoints written by `save_streamed`, usually the
  whole leaf for those the trainer writes.
  """

  def __init__(self, workdir: str, step: int):
    from etils import epath  # noqa: PLC0415

    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    with open(os.path.join(self.directory, "_METADATA")) as f:
      meta = json.load(f)
    self._use_ocdbt = bool(meta.get("use_ocdbt", True))
    self._use_zarr3 = bool(meta.get("use_zarr3", False))
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory)).tree
    self.tree = tree  # nested dicts of orbax ArrayMetadata (shape, dtype, chunk shape)
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)

  def metadata(self, path: tuple[str, ...]):
    node = self.tree
    for k in path:
      node = node[k]
    return node

  def _open(self, path: tuple[str, ...]):
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # noqa: PLC0415

    spec = ts_utils.ArrayReadSpec(self.directory, ".".join(path), self._use_zarr3,
                                  use_ocdbt=self._use_ocdbt)
    return ts.open(ts.Spec(spec.json), open=True, read=True, context=self._context).result()

  def blocks(self, path: tuple[str, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows [first, first + n) of leaf `path`) in chunk-sized blocks (a 0-d
    leaf: one block (0, the value))."""
    t = self._open(path)
    shape = tuple(t.shape)
    if not shape:
      yield 0, np.asarray(t.read().result())
      return
    rows = max(1, int(t.chunk_layout.read_chunk.shape[0] or shape[0]))
    for start in range(0, shape[0], rows):
      yield start, np.asarray(t[start:start + rows].read().result())

  def read(self, path: tuple[str, ...]) -> np.ndarray:
    """The whole leaf `path`."""
    return np.asarray(self._open(path).read().result())
