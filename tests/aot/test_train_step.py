"""moejax/aot/train_step.py: the trainer's step compiled for TPU slices, lowered for GPUs."""

from __future__ import annotations

import re

import pytest

from moejax.aot import train_step
from moejax.checks import ConfigError
from tests.aot.conftest import ep_config, needs_libtpu
from tests.conftest import tiny_config

F32 = 4


def expert_state_bytes(cfg) -> int:
  """Float32 SwiGLU expert weights of every layer plus their two AdamW moments."""
  d, f = cfg.model.d_model, cfg.moe.expert_hidden
  return cfg.model.num_layers * cfg.moe.num_experts * 3 * d * f * F32 * 3


@needs_libtpu
def test_expert_parallel_step_compiles_with_ragged_exchange_and_sharded_experts():
  ep = train_step.compile_for_tpu(ep_config(expert=4), "v5e:2x2")
  assert ep.status == "fits", ep.error
  assert ep.ragged  # what the trainer picks on a 4-chip slice
  assert ep.mesh == {"data": 1, "fsdp": 1, "expert": 4}
  assert ep.gmm_backend == "mosaic_tpu" and ep.mosaic_kernels > 0
  assert ep.ragged_exchanges > 0
  assert ep.required_bytes == (ep.argument_bytes + ep.output_bytes - ep.alias_bytes
                               + ep.temp_bytes + ep.code_bytes)
  assert 0 < ep.required_bytes < ep.hbm_bytes
  assert ep.alias_bytes > 0  # the donated state is updated in place
  assert ep.flops > 0 and ep.compile_s > 0 and ep.lower_s > 0
  # The same model data-parallel: every chip holds all experts and their moments.
  dp = train_step.compile_for_tpu(ep_config(expert=1), "v5e:2x2", ragged=True)
  assert dp.status == "fits", dp.error
  assert dp.mesh == {"data": 4, "fsdp": 1, "expert": 1}
  assert dp.model_flops == ep.model_flops
  assert dp.argument_bytes - ep.argument_bytes == pytest.approx(
      expert_state_bytes(ep_config()) * 3 / 4, rel=0.01)
  # FSDP x EP: experts split 2 x 2 (as with expert=4), the rest of the state
  # over fsdp=2 instead of replicated, gathered for the step.
  cfg = ep_config(expert=2)
  cfg.parallel.fsdp = 2
  fsdp = train_step.compile_for_tpu(cfg, "v5e:2x2")
  assert fsdp.status == "fits", fsdp.error
  assert fsdp.mesh == {"data": 1, "fsdp": 2, "expert": 2}
  assert fsdp.mosaic_kernels == ep.mosaic_kernels and fsdp.ragged_exchanges > 0
  assert fsdp.argument_bytes < ep.argument_bytes
  assert fsdp.model_flops == ep.model_flops


@needs_libtpu
def test_padded_exchange_has_no_ragged_all_to_all():
  r = train_step.compile_for_tpu(ep_config(expert=4), "v5e:2x2", ragged=False)
  assert r.status == "fits", r.error
  assert r.ragged_exchanges == 0 and not r.ragged


@needs_libtpu
def test_a_step_too_large_for_the_chip_is_out_of_memory():
  cfg = ep_config(expert=1)  # 64 experts [1024, 4096] per layer: the state alone is 19 GB
  cfg.model.d_model, cfg.model.num_heads = 1024, 8
  cfg.moe.num_experts, cfg.moe.expert_hidden = 64, 4096
  assert expert_state_bytes(cfg) > 16 * 2**30
  r = train_step.compile_for_tpu(cfg, "v5e:1x1")
  assert r.status == "out_of_memory" and not r.fits
  assert "RESOURCE_EXHAUSTED" in r.error
  assert r.required_bytes > r.hbm_bytes


@pytest.mark.parametrize("data,expert,batch_size,message", [
    (-1, 8, 8, "config key parallel.data=-1 is invalid: the other parallel axes use 8 "
     "devices, which does not divide the 4 available devices"),
    (2, 4, 8, "config keys parallel.data=2, parallel.fsdp=1, parallel.expert=4 are invalid: "
     "their product is 8 but there are 4 devices"),
    (-1, 3, 8, "parallel.expert=3 is invalid: the expert axis size must divide "
     "moe.num_experts=8"),
    (-1, 4, 6, "config key train.batch_size=6 is invalid: each (micro-)batch of 6 "
     "sequences is split over the 4 devices"),
])
def test_a_mesh_or_batch_that_does_not_divide_the_slice_is_a_config_error(
    data, expert, batch_size, message):
  """Raised before libtpu is loaded: these run without it."""
  cfg = ep_config(expert=expert, batch_size=batch_size)
  cfg.parallel.data = data
  with pytest.raises(ConfigError, match=re.escape(message)):
    train_step.compile_for_tpu(cfg, "v5e:2x2")


def test_a_bad_topology_names_the_value():
  with pytest.raises(ValueError, match=re.escape("topology='v5e:3x3' is invalid")):
    train_step.compile_for_tpu(ep_config(), "v5e:3x3")


@needs_libtpu
def test_a_mesh_the_torus_cannot_hold_is_an_error_naming_it():
  cfg = ep_config(expert=8, batch_size=64)  # configs/pod_v6e64.py's mesh on a v5p-64
  cfg.parallel.fsdp = 8
  r = train_step.compile_for_tpu(cfg, "v5p:4x4x4")
  assert r.status == "error" and not r.fits
  assert r.error.startswith("mesh {'data': 1, 'fsdp': 8, 'expert': 8} on v5p:4x4x4: ")
  assert "product of some subset of the physical mesh axis sizes" in r.error


def test_target_config_resolves_only_auto():
  cfg = tiny_config()
  assert train_step.target_config(cfg, "tpu").moe.gmm_backend == "mosaic_tpu"
  assert train_step.target_config(cfg, "gpu").moe.gmm_backend == "triton"
  assert cfg.moe.gmm_backend == "auto"  # a copy
  cfg.moe.gmm_backend = "xla"
  assert train_step.target_config(cfg, "tpu").moe.gmm_backend == "xla"
  with pytest.raises(ValueError, match=r"platform='cuda' is unknown; allowed: \['gpu', 'tpu'\]"):
    train_step.target_config(cfg, "cuda")


@pytest.mark.parametrize("backend,kernels", [("auto", True), ("xla", False)])
def test_gpu_lowering_has_triton_kernels_only_with_the_triton_backend(backend, kernels):
  cfg = tiny_config(gmm_backend=backend)
  g = train_step.lower_for_gpu(cfg)
  assert g.gmm_backend == ("triton" if backend == "auto" else backend)
  assert (g.triton_kernels > 0) == kernels
  assert g.text_bytes > 0
