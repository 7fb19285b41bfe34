"""Orbax checkpoints of the training state plus the data iterator position."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, state_like: Any) -> tuple[Any, dict]:
    """(state with the structure/shapes/dtypes of `state_like`, data state)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
