"""Orbax checkpoints of the training state plus the data iterator position."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class IncompatibleCheckpoint(ValueError):
  """The checkpoint's parameters do not have this config's shapes."""


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
          for p, x in flat if hasattr(x, "shape")}


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
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

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
