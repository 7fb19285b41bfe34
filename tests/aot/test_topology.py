"""moejax/aot/topology.py: topology names, and its chip table checked against libtpu."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from moejax.aot import topology
from tests.aot.conftest import needs_libtpu


@pytest.mark.parametrize("name,chips,bounds", [
    ("v5e:8x8", 64, (2, 2, 1)),
    ("v5e:1x1", 1, (1, 1, 1)),
    ("v6e:2x4", 8, (2, 2, 1)),
    ("v5p:4x4x4", 64, (2, 2, 1)),
])
def test_parse(name, chips, bounds):
  t = topology.parse_topology(name)
  assert (t.name, t.num_chips, t.chips_per_host_bounds) == (name, chips, bounds)
  assert t.chip is topology.CHIPS[name.split(":")[0]]


@pytest.mark.parametrize("name,message", [
    ("v5e-64", "topology='v5e-64' is invalid; allowed: GEN:SHAPE"),
    ("v7x:2x2", "unknown TPU generation 'v7x'; allowed: ['v5e', 'v5p', 'v6e']"),
    ("v5e:2x2x2", "a v5e slice has 2 positive dimensions"),
    ("v5p:4x4", "a v5p slice has 3 positive dimensions"),
    ("v6e:0x4", "a v6e slice has 2 positive dimensions"),
    ("v5e:3x3", "topology='v5e:3x3' is invalid: a v5e slice larger than one host is made of "
     "whole 2x2-chip hosts; allowed: each dimension at most its host's or a multiple of it "
     "(e.g. v5e:2x2)"),
    ("v5p:3x4x4", "made of whole 2x2x1-chip hosts; allowed: each dimension at most its "
     "host's or a multiple of it (e.g. v5p:2x4x4)"),
    ("v5e:32x32", "topology='v5e:32x32' has 1024 chips; allowed: at most 256 (a full v5e pod)"),
])
def test_bad_names(name, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    topology.parse_topology(name)


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
  monkeypatch.setattr(topology, "libtpu_available", lambda: False)
  with pytest.raises(RuntimeError, match=re.escape("needs libtpu") + ".*"
                     + re.escape("pip install -e '.[tpu]'")):
    topology.tpu_devices("v5e:2x2")


@needs_libtpu
def test_devices_of_a_slice():
  devices = topology.tpu_devices("v5e:2x4")
  assert len(devices) == 8 and len({d.id for d in devices}) == 8
  assert {d.platform for d in devices} == {"tpu"}
  assert {d.device_kind for d in devices} == {"TPU v5 lite"}
  assert jax.default_backend() == "cpu"  # this process still runs on the CPU


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e:1x1", "v6e:1x1", "v5p:2x2x1"])
def test_chip_table_matches_the_compiler(name):
  """Device kind, and the HBM the compiler allows one chip's program (its own message)."""
  t = topology.parse_topology(name)
  device = topology.tpu_devices(t)[0]
  assert device.device_kind == t.chip.device_kind
  x = jax.ShapeDtypeStruct((2**17, 2**16), jnp.float32,  # 32 GiB: more than any v5e/v6e
                           sharding=jax.sharding.SingleDeviceSharding(device))
  if t.chip.hbm_bytes > 32 * topology.GiB:
    x = jax.ShapeDtypeStruct((3 * 2**17, 2**16), jnp.float32, sharding=x.sharding)
  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:
    jax.jit(lambda a: a * 2).lower(x).compile()
  available = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(e.value))
  assert available, str(e.value)
  assert float(available.group(1)) == pytest.approx(t.chip.hbm_bytes / topology.GiB, abs=0.01)
