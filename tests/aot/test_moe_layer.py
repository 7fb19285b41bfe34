"""The MoE layer's expert-parallel dispatch (inside `jax.shard_map`) compiled for 4 TPU chips.

Forward + backward of `MoELayer` on v5e:2x2 with the mesh data=1, fsdp=1,
expert=4 (2 of the 8 experts per chip), the experts on the Mosaic kernels:
`dropless` with `ragged_all_to_all` (what the trainer uses on this slice),
`dropless` with the padded `all_to_all` and `capacity`. Needs libtpu.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.aot import topology, train_step
from moejax.config import default_config
from moejax.moe import MoELayer
from moejax.moe.dispatch import expert_parallel
from moejax.parallel import mesh as mesh_lib
from tests.aot.conftest import needs_libtpu

B, L, D, F, E = 8, 16, 128, 128, 8
SIZES = {"data": 1, "fsdp": 1, "expert": 4}


def hlo_ops(text: str) -> dict[str, int]:
  """Mosaic kernels, ragged_all_to_all ops and all_to_all ops moving activations
  (bfloat16/float32; not the int32 size exchanges) in compiled HLO text."""
  return {"mosaic": len(re.findall(r'custom_call_target="tpu_custom_call"', text)),
          "ragged": len(re.findall(r"= \w+\[[\d,]*\]\S* ragged-all-to-all\(", text)),
          "all_to_all": len(re.findall(r"= (?:bf16|f32)\[[\d,]*\]\S* all-to-all\(", text))}


def compile_layer(devices, dispatch: str, ragged: bool):
  c = default_config().moe
  c.num_experts, c.top_k, c.expert_hidden = E, 2, F
  c.dispatch, c.gmm_backend = dispatch, "mosaic_tpu"
  layer = MoELayer(ml_collections.FrozenConfigDict(c), dtype="bfloat16")
  mesh = mesh_lib.make_mesh(SIZES, devices)
  params = jax.eval_shape(lambda k: layer.init(k, jnp.zeros((B, L, D))), jax.random.key(0))
  assert set(params) == {"params"}
  params = params["params"]
  specs = mesh_lib.param_specs(params, SIZES, mesh_lib.expert_leaves(default_config()))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                          sharding=NamedSharding(mesh, s)),
                        params, specs)
  x = jax.ShapeDtypeStruct((B, L, D), jnp.float32,
                           sharding=NamedSharding(mesh, mesh_lib.batch_spec()))

  def loss(p, x):
    y, aux, _ = layer.apply({"params": p}, x)
    return jnp.sum(y) + sum(jnp.sum(a) for a in aux["losses"].values())

  with jax.set_mesh(mesh), train_step.ragged_exchange(ragged):
    return jax.jit(jax.value_and_grad(loss, (0, 1))).lower(params, x).compile(), specs


@pytest.fixture(scope="module")
def devices():
  return topology.tpu_devices("v5e:2x2")


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e:2x2", "v5e:2x8", "v5e:4x8", "v6e:4x4", "v5p:2x2x4"])
def test_the_trainer_picks_ragged_where_the_compiler_takes_it(name):
  """`default_ragged` against the TPU compiler: v5e refuses it above 16 chips."""
  devs = topology.tpu_devices(name)
  mesh = jax.make_mesh((len(devs),), ("expert",), devices=devs)
  rows = 16

  def body(x, s):
    out = jnp.zeros((len(devs) * rows, 128), jnp.float32)
    return jax.lax.ragged_all_to_all(x, out, *s[0], axis_name="expert")

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P("expert")),
                             out_specs=P("expert"), check_vma=False))
  x = jax.ShapeDtypeStruct((len(devs) * rows, 128), jnp.float32,
                           sharding=NamedSharding(mesh, P("expert")))
  s = jax.ShapeDtypeStruct((len(devs), 4, len(devs)), jnp.int32,
                           sharding=NamedSharding(mesh, P("expert")))
  try:
    fn.lower(x, s).compile()
    compiles = True
  except Exception as e:  # noqa: BLE001 (XlaRuntimeError)
    assert "not supported in limited ICI routing" in str(e), str(e)[:2000]
    compiles = False
  assert compiles == (name != "v5e:4x8")
  assert expert_parallel.default_ragged(devs) == compiles


@needs_libtpu
@pytest.mark.parametrize("dispatch,ragged,ops", [
    # Forward: rows to their experts' chips and back; the backward: the same two.
    ("dropless", True, {"mosaic": 9, "ragged": 4, "all_to_all": 0}),
    ("dropless", False, {"mosaic": 9, "ragged": 0, "all_to_all": 4}),
    ("capacity", False, {"mosaic": 0, "ragged": 0, "all_to_all": 4}),
])
def test_expert_parallel_layer_compiles(devices, dispatch, ragged, ops):
  compiled, specs = compile_layer(devices, dispatch, ragged)
  assert hlo_ops(compiled.as_text()) == ops
  assert specs["experts"]["w_gate"] == P("expert", None, None)
  # Per chip: 2 of the 8 experts (3 float32 [D, F] matrices each), the
  # replicated router [D, E] and 1/4 of the tokens.
  expected = (3 * E * D * F // 4 + D * E + B * L * D // 4) * 4
  assert compiled.memory_analysis().argument_size_in_bytes == expected
  _, (grads, _) = compiled.output_shardings
  assert grads["experts"]["w_gate"].spec == P("expert", None, None)
