"""What the trainer needs to run on a mesh: placed state, global batches, sharding.json.

`Layout.from_config(cfg)` resolves the mesh (ConfigError before anything is
compiled) and is None on a single device in a single process, where the
trainer keeps its plain single-device path. Otherwise the training state is
placed with the shardings of moejax/parallel/mesh.py and every batch becomes
one global array whose rows are split over all mesh axes; in a multi-host run
each process passes only the rows its own devices hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.checks import ConfigError
from moejax.parallel import mesh as mesh_lib


@dataclasses.dataclass
class Layout:
  mesh: Mesh
  sizes: dict[str, int]
  expert_leaves: dict = dataclasses.field(default_factory=dict)  # the family's declaration

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Layout | None":
    sizes = mesh_lib.axes_from_config(cfg)
    if math.prod(sizes.values()) == 1 and jax.process_count() == 1:
      return None
    return cls(mesh_lib.make_mesh(sizes), sizes, mesh_lib.expert_leaves(cfg))

  # ----------------------------------------------------------------- state

  def state_specs(self, state: dict) -> dict:
    """PartitionSpecs of the trainer state: params/opt_state per the mesh rules."""
    params = state["params"]
    p_specs = mesh_lib.param_specs(params, self.sizes, self.expert_leaves)
    specs = {k: jax.tree.map(lambda _: P(), v) for k, v in state.items()}
    specs["params"] = p_specs
    specs["opt_state"] = mesh_lib.state_specs(state["opt_state"], params, p_specs)
    return specs

  def state_shardings(self, state: dict) -> dict:
    return mesh_lib.named(self.state_specs(state), self.mesh)

  def put(self, tree: Any, shardings: Any) -> Any:
    """Global arrays from values every process holds in full (same on all hosts)."""
    def one(x, s):
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(one, tree, shardings)

  def replicated(self, x) -> jax.Array:
    return self.put(x, NamedSharding(self.mesh, P()))

  # ----------------------------------------------------------------- batches

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, mesh_lib.batch_spec())

  def local_rows(self, global_batch: int) -> slice:
    """This process's rows of a global batch of `global_batch` sequences."""
    return mesh_lib.local_batch_slice(global_batch, self.mesh)

  def put_batch(self, local: dict, global_batch: int) -> dict:
    """Global [global_batch, ...] arrays from this process's rows `local`."""
    sharding = self.batch_sharding()
    rows = self.local_rows(global_batch)
    for k, v in local.items():
      if len(v) != rows.stop - rows.start:
        raise ValueError(f"batch entry {k!r} has {len(v)} rows on process "
                         f"{jax.process_index()}, whose devices hold rows {rows}")
    return {k: jax.make_array_from_process_local_data(
        sharding, np.asarray(v), (global_batch,) + np.shape(v)[1:]) for k, v in local.items()}

  def put_global_batch(self, batch: dict) -> dict:
    """Like put_batch for a batch every process holds in full (validation)."""
    n = len(next(iter(batch.values())))
    rows = self.local_rows(n)
    return self.put_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, n)

  def write(self, workdir: str, params: Any) -> str:
    return mesh_lib.write_sharding(workdir, self.mesh, params,
                                   mesh_lib.param_specs(params, self.sizes, self.expert_leaves))


class Placement:
  """The trainer's hook: a no-op on one device, else the Layout's placements.

  Used as a context manager around a run; `state()` places the freshly
  initialised state (init runs outside the mesh), writes sharding.json and
  from then on keeps the mesh set (`jax.set_mesh`) for the jitted steps.
  In a multi-host run all processes share `workdir` for checkpoints; process
  0 logs there too, process p > 0 logs to `workdir/hosts/<p>` (`logdir`).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    self.cfg = cfg
    self.workdir = workdir
    p = jax.process_index()
    self.logdir = workdir if p == 0 else os.path.join(workdir, "hosts", str(p))
    self.layout = Layout.from_config(cfg)
    self.state_shardings = None
    self._scope = contextlib.ExitStack()

  def __enter__(self) -> "Placement":
    return self

  def __exit__(self, *exc) -> None:
    self._scope.close()

  def state(self, state: dict) -> dict:
    if self.layout is None:
      return state
    self.state_shardings = self.layout.state_shardings(state)
    state = self.layout.put(state, self.state_shardings)
    if jax.process_index() == 0:
      self.layout.write(self.workdir, state["params"])
    self._scope.enter_context(jax.set_mesh(self.layout.mesh))
    return state

  def train_iterator(self, data, batch_size: int, seed: int):
    """This process's training batches: its data shards, concatenated."""
    shards, mine = data_shards(self.cfg)
    if shards == 1:
      return data.train_iterator(batch_size, seed)
    from moejax.train.data import ShardBatches  # noqa: PLC0415 (train imports parallel)
    return ShardBatches(data, batch_size // shards, seed, mine, shards)

  def batch(self, local: dict) -> dict:
    """A global batch from this process's rows."""
    if self.layout is None:
      return local
    n = len(next(iter(local.values()))) * jax.process_count()
    return self.layout.put_batch(local, n)

  def batches(self, batches: list[dict]) -> list[dict]:
    """Global batches from batches every process holds in full (validation)."""
    if self.layout is None:
      return batches
    return [self.layout.put_global_batch(b) for b in batches]

  def scalar(self, x) -> jax.Array:
    return x if self.layout is None else self.layout.replicated(x)


def data_shards(cfg: ml_collections.ConfigDict) -> tuple[int, list[int]]:
  """(number of data shards, the shards this process reads), contiguous per process.

  `data.shards` = 0 means one per process. Batch row order is shard order, so
  a run's global batches depend on the shard count, not on the process count:
  1 process reading 2 shards sees the batches of 2 processes reading 1 each.
  """
  n_proc, me = jax.process_count(), jax.process_index()
  shards = cfg.data.shards or n_proc
  if shards % n_proc:
    raise ConfigError(f"config key data.shards={cfg.data.shards!r} is invalid: "
                               f"must be a multiple of the {n_proc} processes")
  per = shards // n_proc
  return shards, list(range(me * per, (me + 1) * per))


__all__ = ["Layout", "Placement", "data_shards"]
