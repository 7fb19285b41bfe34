"""Leaf-by-leaf conversion: Hugging Face shards -> run checkpoint, run checkpoint -> shards.

`write_run` writes what `moejax.train.trainer.write_run` writes for the
variables `mapping.from_hf` would return (config.json, checkpoints/<step>
with a fresh optimizer state and the data iterator at its start), without
ever holding them: each leaf of the training state is written through
`moejax.train.checkpoint.save_streamed`, a stacked leaf one layer slice at a
time, each slice read from its source tensors just before it is written;
the optimizer moments are written as zeros the same way. `export` writes the
safetensors shards of a checkpoint's params (and moe_state) reading one
chunk-sized block of one leaf at a time (`StoredArrays`), each tensor put in
its planned place in its shard (`ShardWriter`) as soon as it is converted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.interop import mapping
from moejax.interop.errors import ConversionError
from moejax.interop.safetensors_io import ShardWriter


def _fresh_state_shapes(cfg: ml_collections.ConfigDict, abstract: dict):
  """Shapes of `trainer.state_from_variables` around float32 variables of `abstract`'s shapes,
  after checking that every entry besides the variables starts at zero (so it can be
  written as zeros: Adam's moments and count, the step counters)."""
  from moejax.init import hooks  # noqa: PLC0415
  from moejax.train import checkpoint, optimizer, trainer  # noqa: PLC0415

  tx = hooks.wrap_optimizer(cfg, optimizer.make_optimizer(cfg.train))
  make = lambda v: trainer.state_from_variables(v, tx)  # noqa: E731
  f32 = lambda x: jax.ShapeDtypeStruct(tuple(x.shape), jnp.float32)  # noqa: E731
  shapes = jax.eval_shape(make, jax.tree.map(f32, abstract))
  probe = make(jax.tree.map(lambda x: jnp.ones((1,) * len(x.shape), jnp.float32), abstract))
  for path, x in jax.tree_util.tree_flatten_with_path(probe)[0]:
    names = checkpoint.key_names(path)
    if names[0] not in ("params", "collections") and np.any(np.asarray(x)):
      raise ConversionError(f"internal: the fresh training state entry {'/'.join(map(str, names))}"
                            " does not start at zero; it cannot be written as zeros")
  return shapes


def write_run(cfg: ml_collections.ConfigDict, leaves: mapping.Leaves, reader, run_dir: str,
              step: int = 0) -> None:
  """The run directory of `trainer.write_run(cfg, mapping.from_hf(...), run_dir, step)`, one
  layer slice of one leaf in memory at a time (`leaves` from `mapping.read_plan`)."""
  from moejax.train import checkpoint, data as data_lib, trainer  # noqa: PLC0415

  abstract: dict = {}
  for (coll, path), leaf in leaves.items():
    node = abstract.setdefault(coll, {})
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jax.ShapeDtypeStruct(leaf.shape, jnp.float32)
  shapes = _fresh_state_shapes(cfg, abstract)

  def lazy(keypath, x):
    names = checkpoint.key_names(keypath)
    if names[0] == "params":
      key = ("params", names[1:])
    elif names[0] == "collections":
      key = (names[1], names[2:])
    else:
      return checkpoint.StreamedArray.zeros(x.shape, x.dtype,
                                            checkpoint.layer_stacked(keypath, x))
    leaf = leaves[key]
    return checkpoint.StreamedArray(leaf.shape, np.dtype(np.float32),
                                    lambda i: mapping.read_piece(leaf, i, reader), leaf.stacked)

  state = jax.tree_util.tree_map_with_path(lazy, shapes)
  data = data_lib.from_config(cfg)
  checkpoint.save_streamed(run_dir, step, state,
                           data.train_iterator(cfg.train.batch_size, cfg.seed).get_state(),
                           cfg.train.keep_checkpoints)
  trainer.write_config(cfg, run_dir)


def export(cfg: ml_collections.ConfigDict, groups: list[mapping.Group], arrays, hf_dir: str,
           max_shard_bytes: int) -> list[str]:
  """Writes the safetensors shards of `arrays` (a checkpoint's StoredArrays) as
  `write_tensors(hf_dir, mapping.to_hf(...), max_shard_bytes)` would; returns the files."""
  tree = arrays.tree
  shapes = {"params": tree["params"], **(tree.get("collections") or {})}
  leaves, tensors = mapping.export_plan(cfg, groups, shapes)
  from moejax.train.checkpoint import release_freed_memory  # noqa: PLC0415

  writer = ShardWriter(hf_dir, tensors, max_shard_bytes)
  try:
    for (coll, path), leaf in leaves.items():
      where = ("params",) + path if coll == "params" else ("collections", coll) + path
      if not leaf.stacked:
        for name, x in mapping.export_piece(leaf, 0, arrays.read(where)):
          writer.write(name, x)
        release_freed_memory()
        continue
      for start, block in arrays.blocks(where):
        for j in range(block.shape[0]):
          for name, x in mapping.export_piece(leaf, start + j, block[j]):
            writer.write(name, x)
        del block
        release_freed_memory()
  except BaseException:
    writer.abort()
    raise
  return writer.close()
