"""The training step of a config, compiled for a TPU slice or lowered for a GPU, on a CPU host.

`compile_for_tpu(cfg, "v5e:8x8")` builds the step exactly as the trainer
does (`make_train_step` on the state `init_state` gives, with the shardings
`moejax.parallel` gives them on the config's mesh over the slice's chips),
runs the TPU compiler on it and returns a `TpuCompile`: whether it
compiled, the per-chip memory (arguments, outputs, temporaries, code), the
per-chip FLOPs XLA counts, and the lowering and compile times. A program
that does not fit in a chip's HBM fails to compile with RESOURCE_EXHAUSTED;
the size of the temporaries the compiler names is kept.

`lower_for_gpu(cfg)` lowers the one-device step for CUDA (no GPU and no
CUDA plugin needed: lowering only, so no memory figures) and counts the
Pallas Triton kernels in it.

Two choices the trainer makes from the devices of the running process are
made here for the target instead: `moe.gmm_backend="auto"` becomes
`mosaic_tpu` / `triton`, and the expert-parallel `dropless` exchange is the
one the trainer picks on the slice (`expert_parallel.default_ragged`:
`ragged_all_to_all`, except on v5e slices above 16 chips, where the TPU
compiler refuses it and the padded `all_to_all` is used); `ragged=True` /
`False` forces one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, SingleDeviceSharding

from moejax import model as lm
from moejax.aot.topology import Topology, parse_topology, tpu_devices, uncached_compiles
from moejax.parallel import mesh as mesh_lib
from moejax.parallel.runtime import Layout
from moejax.train import trainer
from moejax.train.optimizer import make_optimizer
from moejax.validation import validate

TRITON_CALL = "__gpu$xla.gpu.triton"  # custom-call target of a Pallas Triton kernel
MOSAIC_CALL = "tpu_custom_call"  # custom-call target of a Pallas Mosaic kernel
RAGGED_OP = "ragged_all_to_all"
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OOM = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


@dataclasses.dataclass
class TpuCompile:
  """One config compiled for one TPU slice; sizes are bytes per chip."""
  config: str
  topology: str
  num_chips: int
  mesh: dict[str, int]
  gmm_backend: str
  ragged: bool  # the dropless exchange: ragged_all_to_all, or the padded all_to_all
  status: str  # "fits", "out_of_memory" or "error"
  error: str = ""  # the compiler's message (first line) when status != "fits"
  hbm_bytes: int = 0  # usable HBM of one chip
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0  # outputs written in place of donated arguments (the state)
  temp_bytes: int = 0
  code_bytes: int = 0
  # Peak: arguments + outputs not aliased to them + temporaries + code; when out
  # of memory, the temporaries the compiler's message names (a lower bound).
  required_bytes: int = 0
  flops: float = 0.0  # per chip per step, as XLA's cost analysis counts them
  model_flops: float = 0.0  # per chip per step, moejax.model.flops_per_token
  mosaic_kernels: int = 0  # Mosaic custom calls in the lowered program
  ragged_exchanges: int = 0  # ragged_all_to_all ops in the lowered program
  lower_s: float = 0.0
  compile_s: float = 0.0

  @property
  def fits(self) -> bool:
    return self.status == "fits"

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class GpuLowering:
  config: str
  gmm_backend: str
  triton_kernels: int  # Triton custom calls in the lowered program
  lower_s: float
  text_bytes: int  # size of the StableHLO text


def target_config(cfg: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of `cfg` with `moe.gmm_backend="auto"` resolved for `platform` ('tpu'/'gpu')."""
  backends = {"tpu": "mosaic_tpu", "gpu": "triton"}
  if platform not in backends:
    raise ValueError(f"platform={platform!r} is unknown; allowed: {sorted(backends)}")
  out = cfg.copy_and_resolve_references()
  if out.moe.gmm_backend == "auto":
    out.moe.gmm_backend = backends[platform]
  return out


@contextlib.contextmanager
def ragged_exchange(ragged: bool):
  """Makes the expert-parallel dispatch use (`ragged=True`) or not use `ragged_all_to_all`.

  The dispatch asks `expert_parallel.default_ragged()`, which looks at the
  devices of this (CPU) process; while tracing for a TPU it must answer for
  the TPU instead.
  """
  from moejax.moe.dispatch import expert_parallel  # noqa: PLC0415
  if not callable(getattr(expert_parallel, "default_ragged", None)):
    raise RuntimeError("moejax.moe.dispatch.expert_parallel.default_ragged is gone: "
                       "moejax.aot cannot choose the exchange for its target")
  saved = expert_parallel.default_ragged
  expert_parallel.default_ragged = lambda devices=None: ragged
  try:
    yield
  finally:
    expert_parallel.default_ragged = saved


def _abstract_state(cfg: ml_collections.ConfigDict):
  tx = make_optimizer(cfg.train)
  return tx, jax.eval_shape(lambda: trainer.init_state(cfg, tx))


def _batch(cfg: ml_collections.ConfigDict, sharding=None) -> dict:
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
          for k in ("inputs", "targets")}


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * _UNITS[unit])


def compile_for_tpu(cfg: ml_collections.ConfigDict, topology: str | Topology, *,
                    ragged: bool | None = None) -> TpuCompile:
  """Compiles the config's training step for every chip of `topology` (see module doc).

  Raises ValueError for a bad topology name and ConfigError for an invalid
  config or a mesh that does not divide the slice's chips (naming the key),
  both before libtpu is loaded; compiler failures (and a mesh that JAX
  cannot lay onto the slice's torus) are returned as the status.
  """
  topo = parse_topology(topology) if isinstance(topology, str) else topology
  cfg = target_config(cfg, "tpu")
  validate(cfg)
  sizes = mesh_lib.axes_from_config(cfg, topo.num_chips)
  devices = tpu_devices(topo)
  if ragged is None:
    from moejax.moe.dispatch import expert_parallel  # noqa: PLC0415
    ragged = expert_parallel.default_ragged(devices)
  tx, state = _abstract_state(cfg)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  result = TpuCompile(config=cfg.name, topology=topo.name, num_chips=topo.num_chips,
                      mesh=sizes, gmm_backend=cfg.moe.gmm_backend, ragged=ragged,
                      status="error", hbm_bytes=topo.chip.hbm_bytes,
                      model_flops=lm.flops_per_token(cfg) * tokens / topo.num_chips)
  scope = contextlib.ExitStack()
  if len(devices) == 1:  # the trainer's one-device path: no mesh
    state_shardings = None
    state_sds = _with_shardings(state, jax.tree.map(
        lambda _: SingleDeviceSharding(devices[0]), state))
    batch = _batch(cfg, SingleDeviceSharding(devices[0]))
  else:
    try:
      mesh = mesh_lib.make_mesh(sizes, devices)
    except (NotImplementedError, ValueError) as e:  # no such mesh on this slice's torus
      result.error = f"mesh {sizes} on {topo.name}: {str(e).splitlines()[0]}"
      return result
    state_shardings = Layout(mesh, sizes, mesh_lib.expert_leaves(cfg)).state_shardings(state)
    state_sds = _with_shardings(state, state_shardings)
    batch = _batch(cfg, NamedSharding(mesh, mesh_lib.batch_spec()))
    scope.enter_context(jax.set_mesh(mesh))
  step = trainer.make_train_step(cfg, tx, state_shardings)
  with scope, ragged_exchange(ragged), uncached_compiles():
    t0 = time.perf_counter()
    lowered = step.lower(state_sds, batch)
    result.lower_s = time.perf_counter() - t0
    text = lowered.as_text()
    result.mosaic_kernels = text.count(MOSAIC_CALL)
    result.ragged_exchanges = text.count(RAGGED_OP)
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (the compiler's errors are XlaRuntimeError)
      result.compile_s = time.perf_counter() - t0
      message = str(e)
      result.error = message.strip().splitlines()[0] if message.strip() else type(e).__name__
      oom = _OOM.search(message)
      if "RESOURCE_EXHAUSTED" in message and oom:  # names the temporaries only
        result.status = "out_of_memory"
        result.temp_bytes = result.required_bytes = _bytes(*oom.group(1, 2))
      return result
    result.compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  result.argument_bytes = int(mem.argument_size_in_bytes)
  result.output_bytes = int(mem.output_size_in_bytes)
  result.alias_bytes = int(mem.alias_size_in_bytes)
  result.temp_bytes = int(mem.temp_size_in_bytes)
  result.code_bytes = int(mem.generated_code_size_in_bytes)
  result.required_bytes = (result.argument_bytes + result.output_bytes - result.alias_bytes
                           + result.temp_bytes + result.code_bytes)
  cost = compiled.cost_analysis() or {}
  result.flops = float(cost.get("flops", 0.0))
  result.status = "fits"
  return result


def lower_for_gpu(cfg: ml_collections.ConfigDict) -> GpuLowering:
  """Lowers the config's one-device training step for CUDA (see module doc)."""
  cfg = target_config(cfg, "gpu")
  validate(cfg)
  tx, state = _abstract_state(cfg)
  step = trainer.make_train_step(cfg, tx, None)
  t0 = time.perf_counter()
  text = step.trace(state, _batch(cfg)).lower(lowering_platforms=("cuda",)).as_text()
  return GpuLowering(config=cfg.name, gmm_backend=cfg.moe.gmm_backend,
                     triton_kernels=text.count(TRITON_CALL),
                     lower_s=time.perf_counter() - t0, text_bytes=len(text))


__all__ = ["GpuLowering", "TpuCompile", "compile_for_tpu", "lower_for_gpu", "ragged_exchange",
           "target_config"]
