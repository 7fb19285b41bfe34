"""The device mesh from `parallel.*` and the sharding of params and batches.

Axes ('data', 'fsdp', 'expert'), sizes from `parallel.data`, `parallel.fsdp`,
`parallel.expert` (-1: all devices the other two leave). The batch (tokens)
is split over all three axes; expert weights over 'expert' on the expert
axis their family declares (moejax/moe/experts/base.py `Leaf`) and over
'fsdp' on the dimension it declares FSDP may shard, when the fsdp size
divides it (a leaf the family shares by all experts of a layer, without an
expert axis, is replicated over 'expert'); every other parameter, and the
optimizer state that mirrors it,
over 'fsdp' on its largest dimension divisible by the fsdp size (replicated
when none is). A cross-layer expert pool's leaves
("expert_pool/experts/<leaf>", moejax/moe/pool.py) are expert leaves too,
so expert parallelism shards the pool as it shards a layer's experts.
Size checks raise `ConfigError` before anything is compiled.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.checks import ConfigError, fail
from moejax.parallel.axes import AXES, TOKEN_AXES

from moejax import layout
from moejax.layout import EXPERTS as EXPERTS_MODULE
from moejax.moe import pool as pool_lib
from moejax.moe.experts import Leaf, get_family


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Device-independent parallel.* rules (the device count is checked by `resolve_axes`)."""
  par = cfg.parallel
  for axis in AXES:
    v = par[axis]
    if v < 1 and v != -1:
      fail(f"parallel.{axis}", v, "must be a positive integer or -1 (all remaining devices)")
  free = [a for a in AXES if par[a] == -1]
  if len(free) > 1:
    raise ConfigError("config keys " + ", ".join(f"parallel.{a}=-1" for a in free)
                      + " are invalid: at most one parallel axis may be -1")
  if cfg.moe.enabled:
    n, key = pool_lib.dispatched_experts(cfg)
    if par.expert > 0 and n % par.expert:
      fail("parallel.expert", par.expert, f"the expert axis size must divide {key}={n}")


def resolve_axes(sizes: dict[str, int], num_devices: int, *,
                 num_experts: int | tuple[int, ...] | None = None,
                 batch_size: int | None = None) -> dict[str, int]:
  """{'data', 'fsdp', 'expert'} sizes with the one -1 filled in; checks the layout.

  Raises ConfigError naming the `parallel.*` key when a size is not a
  positive int or -1, more than one is -1, the product differs from
  `num_devices`, `num_experts` (or each MoE layer's experts, a tuple) is not
  divisible by the expert axis, or the
  (micro-)batch `batch_size` is not divisible by the number of devices.
  """
  for axis in AXES:
    v = sizes[axis]
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
      raise ConfigError(f"config key parallel.{axis}={v!r} is invalid: must be a positive "
                        "integer or -1 (all remaining devices)")
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ConfigError(
        "config keys " + ", ".join(f"parallel.{a}=-1" for a in free) + " are invalid: at "
        "most one parallel axis may be -1 (all remaining devices)")
  fixed = math.prod(sizes[a] for a in AXES if sizes[a] != -1)
  out = dict(sizes)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config key parallel.{free[0]}=-1 is invalid: the other parallel axes use "
          f"{fixed} devices, which does not divide the {num_devices} available devices")
    out[free[0]] = num_devices // fixed
  total = math.prod(out[a] for a in AXES)
  if total != num_devices:
    shown = ", ".join(f"parallel.{a}={sizes[a]}" for a in AXES)
    raise ConfigError(f"config keys {shown} are invalid: their product is {total} but "
                      f"there are {num_devices} devices; allowed: a product of exactly "
                      f"{num_devices} (or set one axis to -1)")
  per_layer = not isinstance(num_experts, int) and num_experts is not None
  for e in (sorted(set(num_experts)) if per_layer else [num_experts]):
    if e is not None and e % out["expert"]:
      raise ConfigError(f"config key parallel.expert={sizes['expert']!r} is invalid: the "
                        f"expert axis has {out['expert']} devices, which must divide "
                        + (f"the experts of every MoE layer (moe.layer_schedule gives {e})"
                           if per_layer else f"moe.num_experts={e}"))
  if batch_size is not None and batch_size % total:
    raise ConfigError(f"config key train.batch_size={batch_size!r} is invalid: each "
                      f"(micro-)batch of {batch_size} sequences is split over the {total} "
                      "devices of the mesh; allowed: a multiple of the device count")
  return out


def axes_from_config(cfg: ml_collections.ConfigDict, num_devices: int | None = None
                     ) -> dict[str, int]:
  """Resolved mesh sizes for a full config on `num_devices` (default: all devices)."""
  n = jax.device_count() if num_devices is None else num_devices
  par, t = cfg.parallel, cfg.train
  micro = t.batch_size // t.grad_accum_steps if t.grad_accum_steps else t.batch_size
  experts = None
  if cfg.moe.enabled:
    experts = (pool_lib.dispatched_experts(cfg)[0] if layout.is_uniform(cfg)
               else tuple(e for e, _ in layout.moe_schedule(cfg)))
  return resolve_axes({a: par[a] for a in AXES}, n, num_experts=experts, batch_size=micro)


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """A mesh with axes AXES (Auto axis types: shardings propagate through jit)."""
  shape = tuple(sizes[a] for a in AXES)
  devices = jax.devices() if devices is None else list(devices)
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh {dict(sizes)} needs {math.prod(shape)} devices, got {len(devices)}")
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_spec() -> P:
  """Leading (batch) dimension over every mesh axis."""
  return P(TOKEN_AXES)


def _path_names(path) -> list[str]:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return names


def default_expert_leaves() -> dict[str, Leaf]:
  """The leaves of the default `moe.expert` family."""
  from moejax.config import default_config  # noqa: PLC0415
  return get_family(default_config().moe).leaves()


def expert_leaves(cfg: ml_collections.ConfigDict) -> dict[str, Leaf]:
  """The declared leaves of the config's expert family (empty for a dense model)."""
  return get_family(cfg.moe).leaves() if cfg.moe.enabled else {}


def param_spec(names: list[str], shape: tuple[int, ...], sizes: dict[str, int],
               leaves: dict[str, Leaf] | None = None) -> P:
  """PartitionSpec of one parameter from its path names and shape (module docstring rules).

  `leaves` are the expert family's declared leaves (default: the default
  family's); a scanned stack's leading layer axis is never sharded.
  """
  leaves = default_expert_leaves() if leaves is None else leaves
  f = sizes.get("fsdp", 1)
  if len(names) >= 2 and names[-2] == EXPERTS_MODULE and names[-1] in leaves:
    leaf = leaves[names[-1]]
    lead = len(shape) - len(leaf.dims)
    if lead >= 0:
      spec = [None] * len(shape)
      if not leaf.shared:  # a leaf shared by all experts is replicated over 'expert'
        spec[lead + leaf.expert_axis] = "expert"
      if leaf.fsdp is not None and f > 1:
        i = lead + leaf.dims.index(leaf.fsdp)
        if shape[i] % f == 0:
          spec[i] = "fsdp"
      return P(*spec)
  if f > 1:
    best = None
    for i, n in enumerate(shape):
      if n % f == 0 and (best is None or n > shape[best]):
        best = i
    if best is not None:
      spec = [None] * len(shape)
      spec[best] = "fsdp"
      return P(*spec)
  return P()


def param_specs(params: Any, sizes: dict[str, int],
                leaves: dict[str, Leaf] | None = None) -> Any:
  """Tree of PartitionSpecs matching `params` (arrays or ShapeDtypeStructs)."""
  leaves = default_expert_leaves() if leaves is None else leaves
  return jax.tree_util.tree_map_with_path(
      lambda path, x: param_spec(_path_names(path), tuple(x.shape), sizes, leaves), params)


def _key(path) -> str:
  return "/".join(_path_names(path))


def state_specs(tree: Any, params: Any, specs: Any) -> Any:
  """Specs for a tree that embeds copies of `params` (optimizer moments).

  A leaf whose path ends with a parameter's path and has its shape gets that
  parameter's spec; everything else (step counts, scalars) is replicated.
  """
  by_path = {}
  for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    by_path[_key(path)] = (tuple(x.shape), spec)

  def pick(path, x):
    key = _key(path)
    for p, (shape, spec) in by_path.items():
      if (key == p or key.endswith("/" + p)) and tuple(x.shape) == shape:
        return spec
    return P()
  return jax.tree_util.tree_map_with_path(pick, tree)


def named(specs: Any, mesh: Mesh) -> Any:
  """PartitionSpec tree -> NamedSharding tree on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def spec_json(spec: P) -> list:
  """A PartitionSpec as JSON: one entry per dimension (null, axis or [axes])."""
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def write_sharding(workdir: str, mesh: Mesh, params: Any, specs: Any,
                   name: str = "sharding.json") -> str:
  """Writes the resolved mesh and every parameter's PartitionSpec; returns the path."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
  out = {
      "mesh": {a: int(mesh.shape[a]) for a in AXES},
      "num_devices": int(mesh.devices.size),
      "num_processes": int(jax.process_count()),
      "batch": spec_json(batch_spec()),
      "params": {_key(path): {"shape": list(x.shape), "spec": spec_json(s)}
                 for (path, x), s in zip(flat, leaves)},
      "rules": "expert weights over 'expert' on their family's expert axis (and 'fsdp' on "
               "the dim it declares); other params and their optimizer moments over 'fsdp' "
               "on the largest divisible dim; batch over all axes",
  }
  path = os.path.join(workdir, name)
  with open(path, "w") as fh:
    json.dump(out, fh, indent=2, sort_keys=True)
  return path


def local_batch_slice(global_batch: int, mesh: Mesh) -> slice:
  """Rows of the global batch whose shards live on this process's devices.

  Used with `jax.make_array_from_process_local_data`: process p feeds the
  rows its addressable devices hold under `batch_spec()`; checked to be one
  contiguous block.
  """
  sharding = NamedSharding(mesh, batch_spec())
  idx = sharding.addressable_devices_indices_map((global_batch,))
  rows = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch)
                 for s in idx.values()})
  lo, hi = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != hi - lo:
    raise ValueError(f"this process's batch shards {rows} are not one contiguous block")
  return slice(lo, hi)


__all__ = ["AXES", "TOKEN_AXES", "axes_from_config", "batch_spec", "make_mesh", "named",
           "param_spec", "param_specs", "resolve_axes", "state_specs", "write_sharding",
           "local_batch_slice"]
