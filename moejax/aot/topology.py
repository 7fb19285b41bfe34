"""TPU slices as compile-only devices: `tpu_devices("v5e:8x8")` on any host.

With libtpu installed (`pip install -e '.[tpu]'`) JAX describes a TPU slice
without owning one (`jax.experimental.topologies`): its devices carry the
chip kind, coordinates and host of every chip, and `jax.jit(...).lower(...)
.compile()` on shardings over them runs the real TPU compiler on the CPU
host. Nothing can execute on these devices.

A topology is named `GEN:SHAPE`: `v5e:2x2`, `v5e:8x8` (the v5e-64 slice),
`v6e:16x16`, `v5p:4x4x4`. `CHIPS` holds what this module knows of each
generation: the HBM the TPU compiler lets one chip's program use (measured
here by compiling a too-large program for one chip of each generation:
v5e 15.75 GiB of 16, v6e 31.25 of 32, v5p 95.74 of 95), the documented bf16
peak, the chips per host and the largest slice (a full pod).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Iterator

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # "v5e"
  device_kind: str  # what jax reports as Device.device_kind
  hbm_bytes: int  # usable by one program, as the TPU compiler reports it
  peak_bf16_flops: float  # documented peak, FLOP/s
  host_bounds: tuple[int, ...]  # chips per host (x, y[, z]) in a multi-host slice
  ndim: int  # 2D (v5e, v6e) or 3D (v5p) topology
  max_chips: int  # a full pod (documented)


CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", "TPU v5 lite", int(15.75 * GiB), 197e12, (2, 2), 2, 256),
    "v6e": Chip("v6e", "TPU v6 lite", int(31.25 * GiB), 918e12, (2, 2), 2, 256),
    "v5p": Chip("v5p", "TPU v5", int(95.74 * GiB), 459e12, (2, 2, 1), 3, 8960),
}

_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # "v5e:8x8"
  chip: Chip
  shape: tuple[int, ...]  # chips along each axis

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    bounds = [min(s, b) for s, b in zip(self.shape, self.chip.host_bounds)]
    return tuple(bounds + [1] * (3 - len(bounds)))


def parse_topology(name: str) -> Topology:
  """`GEN:SHAPE` -> Topology; ValueError naming the bad value and what is allowed."""
  allowed = (f"GEN:SHAPE with GEN one of {sorted(CHIPS)} and SHAPE 2 (v5e, v6e) or "
             "3 (v5p) chip counts joined by 'x', e.g. v5e:8x8, v5p:4x4x4")
  m = _NAME.match(str(name))
  if not m:
    raise ValueError(f"topology={name!r} is invalid; allowed: {allowed}")
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if gen not in CHIPS:
    raise ValueError(f"topology={name!r} names an unknown TPU generation {gen!r}; "
                     f"allowed: {sorted(CHIPS)}")
  chip = CHIPS[gen]
  if len(dims) != chip.ndim or min(dims) < 1:
    raise ValueError(f"topology={name!r} is invalid: a {gen} slice has {chip.ndim} "
                     f"positive dimensions; allowed: {allowed}")
  topo = Topology(name, chip, dims)
  if topo.num_chips > chip.max_chips:
    raise ValueError(f"topology={name!r} has {topo.num_chips} chips; allowed: at most "
                     f"{chip.max_chips} (a full {gen} pod)")
  bounds = topo.chips_per_host_bounds[:chip.ndim]
  if any(d % b for d, b in zip(dims, bounds)):
    host = "x".join(map(str, chip.host_bounds))
    near = "x".join(str(d - d % b) for d, b in zip(dims, bounds))
    raise ValueError(f"topology={name!r} is invalid: a {gen} slice larger than one host is "
                     f"made of whole {host}-chip hosts; allowed: each dimension at most "
                     f"its host's or a multiple of it (e.g. {gen}:{near})")
  return topo


def libtpu_available() -> bool:
  """Whether libtpu (the TPU compiler) is installed: `pip install -e '.[tpu]'`."""
  return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str | Topology) -> list:
  """The compile-only devices of one TPU slice (one per chip, in id order)."""
  topo = parse_topology(topology) if isinstance(topology, str) else topology
  if not libtpu_available():
    raise RuntimeError(f"compiling for topology={topo.name!r} needs libtpu (the TPU "
                       "compiler), which is not installed: pip install -e '.[tpu]'")
  # libtpu lets one process at a time load it (/tmp/libtpu_lockfile), and any JAX
  # process that probes for a TPU holds it while it lives; compiling needs no chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu only here)
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.name, chip_config_name="default",
      chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1)
  devices = list(desc.devices)
  if len(devices) != topo.num_chips:
    raise RuntimeError(f"topology {topo.name!r} gave {len(devices)} devices for "
                       f"{topo.num_chips} chips")
  return devices


@contextlib.contextmanager
def uncached_compiles() -> Iterator[None]:
  """Keeps compiles from JAX's persistent compilation cache while it lasts.

  An executable compiled for compile-only TPU devices cannot be read back
  from the cache (there is no TPU client to load it into: a warning per
  program), so writing it would only fill the cache (0.1-2 MB per tiny test
  program).
  """
  import jax  # noqa: PLC0415
  key = "jax_persistent_cache_min_compile_time_secs"
  saved = getattr(jax.config, key)
  jax.config.update(key, float("inf"))
  try:
    yield
  finally:
    jax.config.update(key, saved)


__all__ = ["CHIPS", "Chip", "GiB", "Topology", "libtpu_available", "parse_topology",
           "tpu_devices", "uncached_compiles"]
